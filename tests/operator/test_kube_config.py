"""kopf's ConnectionInfo -> the official client's Configuration (no cluster needed)."""

from __future__ import annotations

import base64
import os

import kopf
import pytest

from pageant.operator import kube, kube_config

PEM = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def test_token_ca_path_and_verification():
    files: list[str] = []
    cfg, headers = kube_config.configuration(kopf.ConnectionInfo(
        server="https://10.0.0.1:443/", ca_path="/var/run/secrets/kubernetes.io/serviceaccount/ca.crt",
        token="abc"), files)
    assert cfg.host == "https://10.0.0.1:443" and cfg.verify_ssl is True
    assert cfg.ssl_ca_cert == "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    assert cfg.get_api_key_with_prefix("authorization") == "Bearer abc"
    assert headers == {} and files == [] and cfg.retries is False


@pytest.mark.parametrize("encode", [lambda b: base64.b64encode(b).decode(), lambda b: b], ids=["base64", "pem"])
def test_in_memory_certificates_go_to_private_temp_files(encode):
    files: list[str] = []
    cfg, _ = kube_config.configuration(kopf.ConnectionInfo(
        server="https://k:6443", ca_data=encode(PEM), certificate_data=encode(PEM),
        private_key_data=encode(PEM)), files)
    assert sorted(files) == sorted([cfg.ssl_ca_cert, cfg.cert_file, cfg.key_file])
    for path in files:
        assert open(path, "rb").read() == PEM and os.stat(path).st_mode & 0o077 == 0
    kube_config.remove_files(files)
    assert files == [] and not os.path.exists(cfg.ssl_ca_cert)


def test_basic_auth_insecure_and_other_schemes_travel_as_headers():
    cfg, headers = kube_config.configuration(kopf.ConnectionInfo(
        server="https://k", username="u", password="p", insecure=True), [])
    assert cfg.verify_ssl is False and headers["Authorization"].startswith("Basic ")
    assert not cfg.api_key
    _, headers = kube_config.configuration(kopf.ConnectionInfo(server="https://k", scheme="Digest", token="x"), [])
    assert headers == {"Authorization": "Digest x"}


def test_client_removes_its_temp_files_on_close_and_relogin():
    import asyncio

    async def run():
        c = kube.KubeClient(timeout_seconds=1)
        c.set_connection(kopf.ConnectionInfo(server="https://127.0.0.1:1", ca_data=PEM))
        c._get_client()
        first = list(c._client[1])
        assert first and os.path.exists(first[0])
        c.set_connection(kopf.ConnectionInfo(server="https://127.0.0.1:2", ca_data=PEM))
        assert not os.path.exists(first[0])
        c._get_client()
        second = list(c._client[1])
        await c.close()
        assert not os.path.exists(second[0])

    asyncio.run(run())
