"""pageant.operator.kube (the official `kubernetes` client) against kmock: 404/409 are values,
403/5xx typed errors, and what every request carries (credentials, field manager, patch type).

kmock serves from this test's own event loop, so every answer here also shows that the client's
blocking calls run off the loop (a call on the loop would starve the server and time out)."""

from __future__ import annotations

import kmock
import kopf
import pytest
import pytest_asyncio

from pageant.operator import kube

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]

CM = {"apiVersion": "v1", "kind": "ConfigMap",
      "metadata": {"name": "demo", "namespace": "ml", "labels": {"app": "demo"}}, "data": {"a": "1"}}


@pytest_asyncio.fixture
async def client(cluster_api):
    url, cluster = cluster_api
    c = kube.KubeClient(timeout_seconds=5, discovery_ttl_seconds=0)
    c.set_connection(kopf.ConnectionInfo(server=url, token="t0ken"))
    yield c, cluster
    await c.close()


async def test_normal_outcomes_are_values(client):
    c, cluster = client
    assert await c.get("ConfigMap", "ml", "demo") is None
    created = await c.create(CM)
    assert created["metadata"]["name"] == "demo" and cluster.get("ConfigMap", "ml", "demo")["data"] == {"a": "1"}
    with pytest.raises(kube.Conflict):
        await c.create(CM)
    assert (await c.get("ConfigMap", "ml", "demo"))["data"] == {"a": "1"}
    assert [o["metadata"]["name"] for o in await c.list("ConfigMap", "ml", {"app": "demo"})] == ["demo"]
    assert await c.list("ConfigMap", "ml", {"app": "other"}) == []
    patched = await c.patch("ConfigMap", "ml", "demo", {"data": {"b": "2"}})
    assert patched["data"] == {"a": "1", "b": "2"}
    assert await c.patch("ConfigMap", "ml", "nope", {"data": {}}) is None
    assert await c.delete("ConfigMap", "ml", "demo") is True
    assert await c.delete("ConfigMap", "ml", "demo") is False
    assert cluster.get("ConfigMap", "ml", "demo") is None


async def test_requests_carry_credentials_field_manager_and_patch_type(client):
    c, cluster = client
    await c.create(CM)
    await c.patch("ConfigMap", "ml", "demo", {"data": {"b": "2"}})
    [post] = cluster.requests("POST", "/configmaps")
    [patch] = cluster.requests("PATCH", "/configmaps/demo")
    for request in (post, patch):
        assert request.headers["Authorization"] == "Bearer t0ken"
        assert request.headers["User-Agent"] == "pageant-operator"
        assert request.params["fieldManager"] == kube.FIELD_MANAGER
    assert patch.headers["Content-Type"] == "application/merge-patch+json"


async def test_label_selector_is_sent(client):
    c, cluster = client
    await c.list("Pod", "ml", {"b": "2", "a": "1"})
    [listing] = cluster.requests("GET", "/namespaces/ml/pods")
    assert listing.params["labelSelector"] == "a=1,b=2"


@pytest.mark.parametrize("status,error", [(403, kube.Forbidden), (500, kube.ServerError),
                                          (503, kube.ServerError), (401, kube.ServerError)])
async def test_errors_are_typed(client, status, error):
    c, cluster = client
    cluster.k["get /api/v1/namespaces/ml/configmaps/demo"] << (
        lambda request: kmock.KubernetesError(status=status, reason="Nope", message="etcd is sad"))
    cluster.k["post /api/v1/namespaces/ml/configmaps"] << (
        lambda request: kmock.KubernetesError(status=status, reason="Nope", message="etcd is sad"))
    with pytest.raises(error) as info:
        await c.get("ConfigMap", "ml", "demo")
    assert info.value.status == status and "etcd is sad" in str(info.value) and "ConfigMap" in str(info.value)
    with pytest.raises(error):
        await c.create(CM)


async def test_api_available_follows_installed_crds(client):
    c, cluster = client
    assert await c.api_available("Deployment") is True
    assert await c.api_available("ScaledObject") is False
    cluster.install("ScaledObject")
    assert await c.api_available("ScaledObject") is True


async def test_closed_client_is_unreachable(client):
    c, _ = client
    await c.close()
    with pytest.raises(kube.Unreachable):
        await c.get("ConfigMap", "ml", "demo")


async def test_not_logged_in_is_unreachable():
    c = kube.KubeClient(timeout_seconds=1)
    try:
        with pytest.raises(kube.Unreachable, match="not logged in"):
            await c.get("ConfigMap", "ml", "demo")
    finally:
        await c.close()


async def test_silent_server_and_tls_failure_are_unreachable():
    """A server that accepts but never answers: a read timeout (http), a TLS handshake timeout (https)."""
    import asyncio

    async def silent(reader, writer):
        await reader.read()  # until the client gives up and closes the connection
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        for url in (f"http://127.0.0.1:{port}", f"https://127.0.0.1:{port}"):
            c = kube.KubeClient(timeout_seconds=0.5)
            c.set_connection(kopf.ConnectionInfo(server=url, insecure=True))
            try:
                with pytest.raises(kube.Unreachable):
                    await asyncio.wait_for(c.get("ConfigMap", "ml", "demo"), 5)
            finally:
                await c.close()
    finally:
        server.close()
