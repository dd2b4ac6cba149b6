"""kopf's credentials (a ``kopf.ConnectionInfo``) as the official client's ``Configuration``.

Host, CA (path, or PEM/base64 data written to a private temp file), client certificate and key,
``insecure`` (no verification) and the proxy become ``kubernetes.client.Configuration`` fields; a
bearer token becomes its ``api_key``. Basic auth and other schemes travel as kopf renders them
(``ConnectionInfo.as_http_headers()``), as a default header of the ``ApiClient``.
"""

from __future__ import annotations

import base64
import contextlib
import os
import tempfile
from typing import Any

from kubernetes import client as k8s


def _pem(data: str | bytes) -> bytes:
    """kubeconfig's ``*-data`` fields are base64 of PEM; kopf may hand over PEM itself."""
    raw = data.encode("ascii") if isinstance(data, str) else bytes(data)
    return raw if raw.lstrip().startswith(b"-----") else base64.b64decode(raw)


def _write_private(data: str | bytes, files: list[str]) -> str:
    fd, path = tempfile.mkstemp(prefix="pageant-kube-", suffix=".pem")  # mode 0600
    files.append(path)
    with os.fdopen(fd, "wb") as f:
        f.write(_pem(data))
    return path


def remove_files(files: list[str]) -> None:
    for path in files:
        with contextlib.suppress(OSError):
            os.unlink(path)
    files.clear()


def configuration(info: Any, files: list[str]) -> tuple[k8s.Configuration, dict[str, str]]:
    """(Configuration, extra default headers) for one ConnectionInfo. Paths of temp files written
    for in-memory certificates are appended to ``files`` (the caller removes them on close)."""
    cfg = k8s.Configuration()
    cfg.host = str(info.server).rstrip("/")
    cfg.verify_ssl = not info.insecure
    cfg.retries = False  # no hidden retries: the reconciler retries with backoff
    try:
        if info.ca_path:
            cfg.ssl_ca_cert = os.fsdecode(info.ca_path)
        elif info.ca_data:
            cfg.ssl_ca_cert = _write_private(info.ca_data, files)
        if info.certificate_path:
            cfg.cert_file = os.fsdecode(info.certificate_path)
        elif info.certificate_data:
            cfg.cert_file = _write_private(info.certificate_data, files)
        if info.private_key_path:
            cfg.key_file = os.fsdecode(info.private_key_path)
        elif info.private_key_data:
            cfg.key_file = _write_private(info.private_key_data, files)
    except BaseException:
        remove_files(files)
        raise
    if getattr(info, "proxy_url", None):
        cfg.proxy = info.proxy_url
    headers: dict[str, str] = {}
    if info.token and not (info.username and info.password) and (info.scheme or "Bearer") == "Bearer":
        cfg.api_key = {"authorization": info.token}
        cfg.api_key_prefix = {"authorization": "Bearer"}
    else:
        headers = dict(info.as_http_headers())  # basic auth, or another scheme, or nothing
    return cfg, headers
