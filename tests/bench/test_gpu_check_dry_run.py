"""benchmarks/gpu_check.sh --dry-run on the CPU, so the GPU check cannot rot without a GPU.

The dry run goes through every step with tiny shapes (the gpu tests in Triton's interpreter, one
parametrization each; decode, throughput against transformers' generate and continuous batching,
and ``pageant serve`` with ``pageant bench serve`` at 3 rates); the result folder must hold the
eight files the device tool can bring back, each JSON with the common header, and the summary.
Also: the ``gpu`` marker's default deselection, and the carried-wheel selection.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(ROOT / "benchmarks"))
from gpu_check import HEADER_FIELDS, wheels_to_install  # noqa: E402

FILES = {"step1_tests.json", "step2_decode.json", "step3_throughput.json", "step4_serve.json", "gpu_check.json",
         "summary.txt", "gpu_check.png", "gpu_check.log"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    env = {**os.environ, "PYTHON": sys.executable, "PAGEANT_COMMIT": "0123abc"}
    env.pop("OUT", None)
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--result-dir", str(out)], capture_output=True,
                          text=True, timeout=400, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return out, proc.stdout


@pytest.mark.slow
def test_result_folder_holds_what_the_device_tool_brings_back(dry_run):
    out, _ = dry_run
    assert {p.name for p in out.iterdir()} == FILES  # at most 8 files, no folders
    for name in FILES:
        if name.endswith(".json"):
            doc = json.loads((out / name).read_text())
            assert set(HEADER_FIELDS) <= set(doc), name
            assert doc["dry_run"] is True and doc["git_commit"] == "0123abc" and doc["complete"] is True, name
            assert doc["torch"] and doc["transformers"] and doc["device"].startswith("cpu"), name
    assert (out / "gpu_check.png").stat().st_size > 10_000


@pytest.mark.slow
def test_every_step_measured_something(dry_run):
    out, _ = dry_run
    load = lambda name: json.loads((out / name).read_text())  # noqa: E731
    tests = load("step1_tests.json")
    assert tests["counts"].get("passed", 0) >= 10 and not tests["failures"], tests
    assert tests["exitstatus"] == 0 and tests["collected"] == sum(tests["counts"].values())
    assert all("CUDA" in s["message"] for s in tests["skipped"])  # only the graph tests skip on a CPU
    decode = load("step2_decode.json")
    assert {(p["batch"], p["context"]) for p in decode["points"]} == {(1, 16), (4, 16), (1, 48), (4, 48)}
    assert all(p["step_ms"] > 0 and p["roofline_ms"] > 0 for p in decode["points"])
    th = load("step3_throughput.json")
    assert set(th["sides_done"]) == {"pageant", "hf", "hf_cb"}
    assert th["pageant"]["complete"] and th["pageant_hf_set"]["num_requests"] == 6
    assert [r["batch_size"] for r in th["hf_generate"]] == [4, 2]
    cb = th["hf_continuous_batching"]
    assert cb["has_generate_batch"] and cb["complete"] and cb["output_tokens"] == cb["expected_tokens"]
    assert cb["exact_lengths"] and not cb["cuda_graph_warmup"] and cb["cb_config"]["num_blocks"] == 64  # shared code
    assert th["pageant_hf_set"]["output_tokens"] == cb["expected_tokens"] == th["hf_generate"][0]["output_tokens"]
    serve = load("step4_serve.json")
    assert [r["request_rate"] for r in serve["runs"]] == ["20", "50", "inf"]
    assert all(r["completed"] == 5 and r["failed"] == 0 and r["ttft_ms"]["p99"] > 0 for r in serve["runs"])


@pytest.mark.slow
def test_summary_judges_the_goals_and_is_printed_last(dry_run):
    out, stdout = dry_run
    doc = json.loads((out / "gpu_check.json").read_text())
    assert [g["goal"] for g in doc["goals"]] == [
        "every gpu test passes", "batch 1 within 1.3x of the roofline", ">= 70% of the bandwidth at batch 64",
        ">= 10x HF generate", "serve: every request completes"]
    assert doc["goals"][0]["met"] and doc["goals"][4]["met"]
    assert set(doc["results"]) == {"tests", "decode", "throughput", "serve"}
    assert set(doc["steps"]) == {"tests", "decode", "throughput_pageant", "throughput_hf", "throughput_hf_cb", "serve"}
    assert all(s["rc"] == 0 for s in doc["steps"].values())
    text = (out / "summary.txt").read_text()
    assert text.startswith("GPU check (DRY RUN, CPU)") and "goals:" in text and "serve rate  inf:" in text
    assert len(text.splitlines()) <= 40  # one screen
    assert stdout.rstrip().endswith(f"results in {out}") and text.splitlines()[0] in stdout


def test_gpu_marker_is_deselected_by_default_and_selected_with_m_gpu():
    def collect(*args):
        proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", *args,
                               str(ROOT / "tests" / "gpu")], capture_output=True, text=True, timeout=300, cwd=ROOT)
        return proc.stdout.strip().splitlines()[-1]

    default, selected = collect(), collect("-m", "gpu")
    assert default.startswith("no tests collected (") and "deselected" in default, default
    count = int(default.split("(")[1].split()[0])
    assert count > 50 and selected.startswith(f"{count} tests collected"), (default, selected)


def test_carried_wheels_are_installed_only_where_missing_or_older(tmp_path):
    import pytest as installed

    for name in (f"pytest-{installed.__version__}.0.1-py3-none-any.whl", "pytest-1.0-py3-none-any.whl",
                 "pageant_no_such_dist-1.0-py3-none-any.whl"):
        (tmp_path / name).write_bytes(b"")
    picked = {p.name for p in wheels_to_install(tmp_path)}
    assert picked == {f"pytest-{installed.__version__}.0.1-py3-none-any.whl", "pageant_no_such_dist-1.0-py3-none-any.whl"}
