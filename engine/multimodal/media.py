"""Image bytes from a request: ``data:`` URIs and (allowed hosts only) http(s) URLs, decoded with limits.

Every failure raises ``MediaError`` (a ``ValueError`` whose message fits an HTTP 400): bytes that
are not an image, a format other than PNG / JPEG / WebP, more pixels than ``max_pixels`` (checked
from the header, before decoding, so a decompression bomb is refused cheaply), a body over
``max_bytes``, a URL whose host is not in ``allowed_domains`` (vLLM's ``--allowed-media-domains``;
empty: no URL is fetched) or a fetch slower than ``fetch_timeout`` seconds.
"""

from __future__ import annotations

import base64
import binascii
import io
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

FORMATS = ("PNG", "JPEG", "WEBP")


class MediaError(ValueError):
    """An image that cannot be used; the message names why."""


@dataclass(frozen=True)
class MediaLimits:
    """Limits on the images of one request."""

    max_pixels: int = 4096 * 4096
    max_bytes: int = 20 * 2**20
    allowed_domains: tuple[str, ...] = ()
    fetch_timeout: float = 10.0

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.max_bytes < 1 or not self.fetch_timeout > 0:
            raise ValueError("MediaLimits: max_pixels, max_bytes and fetch_timeout must be positive")


def decode_image(data: bytes, limits: MediaLimits = MediaLimits()):
    """A PIL image (RGB) from encoded bytes, within ``limits``."""
    from PIL import Image

    if len(data) > limits.max_bytes:
        raise MediaError(f"the image is {len(data)} bytes; at most {limits.max_bytes} are allowed")
    try:
        image = Image.open(io.BytesIO(data))
    except (Image.UnidentifiedImageError, OSError, ValueError) as exc:
        raise MediaError(f"the image data could not be decoded: {exc}") from None
    except Image.DecompressionBombError as exc:  # PIL's own guard (far above max_pixels by default)
        raise MediaError(f"the image is too large: {exc}") from None
    if image.format not in FORMATS:
        raise MediaError(f"unsupported image format {image.format}; supported: {', '.join(FORMATS)}")
    width, height = image.size
    if width * height > limits.max_pixels:
        raise MediaError(f"the image is {width}x{height} = {width * height} pixels; at most "
                         f"{limits.max_pixels} are allowed")
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise MediaError(f"the image data could not be decoded: {exc}") from None
    return image.convert("RGB")


def _data_uri(url: str) -> bytes:
    header, sep, payload = url[5:].partition(",")
    if not sep or not header.endswith(";base64"):
        raise MediaError("a data: URL must be 'data:image/<format>;base64,<data>'")
    mime = header[: -len(";base64")].lower()
    if not mime.startswith("image/"):
        raise MediaError(f"a data: URL must hold an image (image/png, image/jpeg, image/webp), got {mime or 'none'!r}")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError("the data: URL's base64 payload is not valid base64") from None


def _fetch(url: str, limits: MediaLimits) -> bytes:
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if host not in {d.lower() for d in limits.allowed_domains}:
        raise MediaError(f"image URLs from {host or 'this host'!r} are not allowed"
                         + (f" (allowed: {', '.join(limits.allowed_domains)})" if limits.allowed_domains else
                            "; the server fetches no URLs (--allowed-media-domains); send the image as a data: URL"))

    class NoRedirect(urllib.request.HTTPRedirectHandler):  # a redirect could leave the allowed hosts
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect, urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers={"User-Agent": "pageant"}),
                         timeout=limits.fetch_timeout) as resp:
            data = resp.read(limits.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise MediaError(f"could not fetch the image {url!r}: {exc}") from None
    if len(data) > limits.max_bytes:
        raise MediaError(f"the image at {url!r} is over {limits.max_bytes} bytes")
    return data


def load_image_url(url: str, limits: MediaLimits = MediaLimits()):
    """The PIL image an OpenAI ``image_url`` names: a ``data:`` URL, or an http(s) URL of an allowed host."""
    if not isinstance(url, str) or not url:
        raise MediaError("image_url.url must be a non-empty string")
    scheme = url.split(":", 1)[0].lower()
    if scheme == "data":
        return decode_image(_data_uri(url), limits)
    if scheme in ("http", "https"):
        return decode_image(_fetch(url, limits), limits)
    raise MediaError(f"unsupported image URL scheme {scheme!r}: use a data: URL (or http(s) from an allowed domain)")
