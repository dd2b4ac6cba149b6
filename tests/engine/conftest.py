"""Engine tests run torch on one thread: the CI machine has 2 cores shared by parallel work, and
multi-threaded tiny ops under contention are 10-50x slower than single-threaded ones.

``run_interpreted(script, *args)`` runs a Python script in a subprocess under Triton's CPU
interpreter (``TRITON_INTERPRET=1`` must be set before triton is imported) and returns the JSON
object it prints on its last line of stdout.
"""

import json
import os
import subprocess
import sys

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def run_interpreted():
    """``run_interpreted(script, *args) -> dict``: ``python -c script *args`` with TRITON_INTERPRET=1;
    fails the test with its stderr when it exits non-zero."""

    def run(script: str, *args: str) -> dict:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        proc = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    return run
