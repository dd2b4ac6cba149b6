"""Tensor/pipeline-parallel tests: every test must leave no worker process behind."""

from __future__ import annotations

import os
import time

import psutil
import pytest

WORKER = "pageant.engine.distributed.worker"


def worker_processes(root: int | None = None) -> list[psutil.Process]:
    """Live worker processes descended from ``root`` (default: this test process)."""
    try:
        children = psutil.Process(root or os.getpid()).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for p in children:
        try:
            if p.status() != psutil.STATUS_ZOMBIE and WORKER in " ".join(p.cmdline()):
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def wait_gone(root: int | None = None, timeout: float = 15.0) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = worker_processes(root)
        if not left:
            return []
        time.sleep(0.1)
    return worker_processes(root)


@pytest.fixture(autouse=True)
def no_leftover_workers():
    yield
    import gc

    gc.collect()  # an LLM the test dropped shuts its workers down when collected
    left = wait_gone()
    for p in left:
        p.kill()
    assert not left, f"worker processes left behind: {[p.pid for p in left]}"
