"""The GPU tests (marker ``gpu``): Triton kernels, CUDA graphs and the engine against references on CUDA.

Every module here sets ``pytestmark = pytest.mark.gpu``. pyproject's ``addopts`` carries
``-m "not gpu"``, so a plain ``pytest`` deselects them (they are neither run nor counted as passed);
``pytest -m gpu tests/gpu`` selects them (the last ``-m`` wins). On a CUDA machine run them with
``TRITON_INTERPRET=0`` (``benchmarks/gpu_check.sh`` does), else the root conftest turns Triton's
interpreter on and the ``device`` fixture fails, saying so.

``PAGEANT_GPU_TESTS_ON_CPU=1`` (the script's ``--dry-run``) runs them on the CPU instead, so the test
code cannot rot without a GPU: Triton's interpreter, only the first parametrization of each test
function (each list's first case is small on purpose), and the tests that need CUDA itself (graph
capture) skip. Without CUDA and without that variable, the ``device`` fixture fails: a selected GPU
test never passes on a machine that cannot run it.

``PAGEANT_GPU_TESTS_REPORT=FILE`` appends one JSON line per test outcome (and the collected count,
and the exit status at the end) as the run goes, so a run stopped by a time limit still reports
what it did (``benchmarks/gpu_check.py tests`` reads it).
"""

from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass

import pytest
import torch

ON_CPU = os.environ.get("PAGEANT_GPU_TESTS_ON_CPU") == "1"
REPORT = os.environ.get("PAGEANT_GPU_TESTS_REPORT")
HERE = pathlib.Path(__file__).resolve().parent
POISON = 1000.0  # written into every slot no sequence owns: a kernel that reads one is far off

# ||out - ref|| / ||ref|| against a float32 reference on the same rounded inputs (METHOD.md: bf16
# operands land between 1e-3 and 1e-2; fp16 has 3 more mantissa bits)
REL_TOL = {torch.bfloat16: 1.6e-2, torch.float16: 4e-3, torch.float32: 1e-5}


def pytest_collection_modifyitems(config, items):
    """On the CPU (dry run): keep the first parametrization of each test function in this folder."""
    if not ON_CPU:
        return
    seen: set[tuple[str, str]] = set()
    keep, drop = [], []
    for item in items:
        path = pathlib.Path(str(item.path)).resolve()
        if HERE not in path.parents:
            keep.append(item)
            continue
        key = (str(path), getattr(item, "originalname", item.name))
        (drop if key in seen else keep).append(item)
        seen.add(key)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def _report(record: dict, worker_too: bool = False) -> None:
    """Append a line; under pytest-xdist only the controller writes (it sees every worker's reports),
    except the collected count, which only worker gw0 knows."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if REPORT and (worker is None or (worker_too and worker == "gw0")):
        with open(REPORT, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def pytest_collection_finish(session):
    _report({"collected": len(session.items)}, worker_too=True)


def pytest_runtest_logreport(report):
    """One line per test: its call, or the setup/teardown that failed or skipped it."""
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed") or report.failed:
        outcome = report.outcome if report.when == "call" or report.outcome == "skipped" else "error"
        message = ""
        if report.skipped and isinstance(report.longrepr, tuple):
            message = report.longrepr[2]
        elif report.failed:
            message = "\n".join(report.longreprtext.splitlines()[-15:])[-3000:]
        _report({"nodeid": report.nodeid, "when": report.when, "outcome": outcome,
                 "duration": report.duration, "message": message})


def pytest_collectreport(report):
    if report.failed:  # an import error in a test module: pytest runs nothing, say which and why
        _report({"nodeid": report.nodeid, "when": "collect", "outcome": "error", "duration": 0.0,
                 "message": "\n".join(report.longreprtext.splitlines()[-15:])[-3000:]})


def pytest_sessionfinish(session, exitstatus):
    _report({"exitstatus": int(exitstatus)})


@pytest.fixture(scope="session")
def device() -> str:
    """``"cuda"`` on a GPU machine (compiled Triton), ``"cpu"`` in the dry run; fails otherwise."""
    if ON_CPU:
        return "cpu"
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need a CUDA device (PAGEANT_GPU_TESTS_ON_CPU=1 runs them on the CPU)",
                    pytrace=False)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        pytest.fail("TRITON_INTERPRET=1 on a CUDA machine: run the gpu tests with TRITON_INTERPRET=0",
                    pytrace=False)
    return "cuda"


@pytest.fixture
def requires_cuda(device) -> str:
    """For tests that need CUDA itself (graph capture): skipped in the CPU dry run."""
    if device != "cuda":
        pytest.skip("needs CUDA itself (CUDA graphs); skipped in the CPU dry run")
    return device


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (inf when actual has a non-finite value)."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if not torch.isfinite(a).all():
        return float("inf")
    return float((a - e).norm() / e.norm().clamp_min(1e-30))


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = rel_error(actual, expected)
    assert err <= REL_TOL[dtype], f"{what} relative error {err:.3g} > {REL_TOL[dtype]:g} ({dtype})"


@dataclass
class PagedKV:
    """A random paged cache holding ``seq_lens`` tokens per sequence in shuffled blocks."""

    k_cache: torch.Tensor  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    seq_lens: torch.Tensor  # [num_seqs] int32


def build_paged_kv(seq_lens, block_size, num_kv_heads, head_dim, dtype, device, seed) -> PagedKV:
    """Random K/V in every owned slot and ``POISON`` everywhere else (spare blocks, partial-block
    tails); block-table padding points at a poisoned spare block."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(per_seq) + 2
    order = torch.randperm(num_blocks, generator=gen)
    spare = int(order[-1])
    tables = torch.full((len(seq_lens), max(per_seq) + 1), spare, dtype=torch.int32)
    owned = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    cursor = 0
    for i, (n, nb) in enumerate(zip(seq_lens, per_seq)):
        ids = order[cursor:cursor + nb]
        cursor += nb
        tables[i, :nb] = ids.to(torch.int32)
        owned.view(-1).index_fill_(0, (ids[:, None] * block_size + torch.arange(block_size)).view(-1)[:n], True)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    caches = []
    for _ in range(2):
        cache = torch.randn(shape, generator=gen)
        cache[~owned] = POISON
        caches.append(cache.to(dtype).to(device))
    return PagedKV(caches[0], caches[1], tables.to(device), torch.tensor(seq_lens, dtype=torch.int32, device=device))


def hf_greedy_on(path: str, prompts: list[list[int]], max_new: int, dtype: torch.dtype, device: str,
                 adapter: str | None = None) -> list[list[int]]:
    """Exactly ``max_new`` greedy tokens per prompt from transformers in ``dtype`` on ``device`` (one
    prompt at a time, no padding), with a PEFT ``adapter`` merged when given."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model = model.to(device=device, dtype=dtype).eval()
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            x = torch.tensor([ids], device=device)
            out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new,
                                 min_new_tokens=max_new, eos_token_id=None, pad_token_id=0)
            outs.append(out[0, len(ids):].tolist())
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return outs
