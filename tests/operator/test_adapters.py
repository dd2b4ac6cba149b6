"""Adapter loading with backoff (pure, against a stub pod client and a fake clock)."""

from __future__ import annotations

import asyncio

from pageant.operator import adapters, spec
from pageant.operator.podclient import PodCallResult, error_message


class StubPods:
    def __init__(self):
        self.loaded: set[str] = set()
        self.fail: set[str] = {"bad"}
        self.loads: list[str] = []

    async def adapters(self, ip):
        return PodCallResult(True, 200), set(self.loaded)

    async def load_adapter(self, ip, name, path):
        self.loads.append(name)
        if name in self.fail:
            return PodCallResult(False, 404, "The adapter bad does not exist")
        self.loaded.add(name)
        return PodCallResult(True, 200)

    async def unload_adapter(self, ip, name):
        self.loaded.discard(name)
        return PodCallResult(True, 200)


POD = {"metadata": {"name": "p0", "uid": "u0"}, "status": {"phase": "Running", "podIP": "10.0.0.1",
                                                            "conditions": [{"type": "Ready", "status": "True"}]}}


def test_failed_load_backs_off_then_recovers(make_body):
    s = spec.parse(make_body(adapters=[{"name": "ok", "hub": {"repo": "o/ok"}}, {"name": "bad", "hub": {"repo": "o/bad"}}]))
    now = [0.0]
    backoff = adapters.AdapterBackoff(base_seconds=2.0, max_seconds=8.0, clock=lambda: now[0])
    pods = StubPods()

    def run():
        return asyncio.run(adapters.sync(pods, backoff, s, [POD]))

    first = run()
    assert first.counts == {"ok": 1, "bad": 0} and "does not exist" in first.failed["bad"]
    assert pods.loads.count("bad") == 1
    for t in (0.5, 1.0, 1.9):  # resyncs inside the backoff window: no new attempt, still Failed
        now[0] = t
        assert "bad" in run().failed
    assert pods.loads.count("bad") == 1
    now[0] = 2.0
    run()
    assert pods.loads.count("bad") == 2  # retried, failed again: next wait 4 s, then 8 s (the cap)
    now[0] = 5.9
    run()
    assert pods.loads.count("bad") == 2
    now[0] = 6.0
    run()
    now[0] = 14.0
    run()
    assert pods.loads.count("bad") == 4
    pods.fail.clear()  # fixed (e.g. the files appeared)
    now[0] = 22.0
    fixed = run()
    assert fixed.failed == {} and fixed.counts == {"ok": 1, "bad": 1} and backoff.failures == {}


def test_replica_that_lost_adapters_is_put_right(make_body):
    s = spec.parse(make_body(adapters=[{"name": "ok", "hub": {"repo": "o/ok"}}]))
    pods, backoff = StubPods(), adapters.AdapterBackoff()
    asyncio.run(adapters.sync(pods, backoff, s, [POD]))
    pods.loaded.clear()  # restart / OOM
    again = asyncio.run(adapters.sync(pods, backoff, s, [POD]))
    assert again.counts == {"ok": 1} and pods.loads == ["ok", "ok"]


def test_error_message_shapes():
    assert error_message({"error": {"message": "m1"}}) == "m1"
    assert error_message({"message": "m2", "type": "NotFoundError"}) == "m2"
    assert error_message({"detail": "m3"}) == "m3"
    assert error_message("text") == "" and error_message(None) == ""
