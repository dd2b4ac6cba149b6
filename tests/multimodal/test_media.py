"""Image decoding and fetching with limits (``pageant.engine.multimodal.media``): data URLs in PNG,
JPEG and WebP, and every refusal: undecodable bytes, other formats, decompression bombs, URLs from
hosts outside ``allowed_domains``, bodies over the size limit; allowed hosts are fetched (a local
http.server on 127.0.0.1)."""

from __future__ import annotations

import base64
import http.server
import io
import threading

import numpy as np
import pytest
from PIL import Image

from pageant.engine.multimodal.inputs import image_hash
from pageant.engine.multimodal.media import MediaError, MediaLimits, decode_image, load_image_url


def _bytes(image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_data_urls_decode(images, data_url, fmt):
    decoded = load_image_url(data_url(images[0], fmt))
    assert decoded.mode == "RGB" and decoded.size == images[0].size
    if fmt != "JPEG":  # lossless: the same pixels, so the same content hash (cache key)
        assert image_hash(decoded) == image_hash(images[0])


@pytest.mark.parametrize(("url", "message"), [
    (_url(b"definitely not an image"), "could not be decoded"),
    ("data:image/png;base64,@@@", "not valid base64"),
    ("data:text/plain;base64,aGk=", "must hold an image"),
    ("data:image/png,rawbytes", "base64"),
    ("file:///etc/passwd", "unsupported image URL scheme"),
    ("https://example.com/cat.png", "not allowed"),
])
def test_bad_urls_are_refused(url, message):
    with pytest.raises(MediaError, match=message):
        load_image_url(url)


def test_unsupported_format_and_truncated_data(images):
    with pytest.raises(MediaError, match="unsupported image format GIF"):
        decode_image(_bytes(images[0], "GIF"))
    with pytest.raises(MediaError, match="unsupported image format BMP"):
        decode_image(_bytes(images[0], "BMP"))
    with pytest.raises(MediaError, match="could not be decoded"):
        decode_image(_bytes(images[0], "PNG")[:60])


def test_decompression_bomb_is_refused_before_decoding():
    bomb = _bytes(Image.new("RGB", (6000, 6000)), "PNG")  # ~100 KB of PNG, 36 M pixels
    assert len(bomb) < 2**20
    with pytest.raises(MediaError, match="36000000 pixels; at most 16777216"):
        decode_image(bomb)
    with pytest.raises(MediaError, match="104898 bytes; at most 100 are allowed"):
        decode_image(bomb, MediaLimits(max_bytes=100))


@pytest.fixture
def image_server(images):
    png = _bytes(images[1], "PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = png if self.path == "/cat.png" else b"x" * 5000
            self.send_response(200 if self.path != "/missing" else 404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_http_fetch_only_from_allowed_hosts(image_server, images):
    allowed = MediaLimits(allowed_domains=("127.0.0.1",), fetch_timeout=5)
    fetched = load_image_url(f"{image_server}/cat.png", allowed)
    assert np.array_equal(np.asarray(fetched), np.asarray(images[1]))
    with pytest.raises(MediaError, match="not allowed"):
        load_image_url(f"{image_server}/cat.png")  # no allowed domains: nothing is fetched
    with pytest.raises(MediaError, match="'localhost' are not allowed"):
        load_image_url(image_server.replace("127.0.0.1", "localhost") + "/cat.png", allowed)
    with pytest.raises(MediaError, match="over 1000 bytes"):
        load_image_url(f"{image_server}/big", MediaLimits(allowed_domains=("127.0.0.1",), max_bytes=1000))
    with pytest.raises(MediaError, match="could not fetch"):
        load_image_url(f"{image_server}/missing", allowed)
