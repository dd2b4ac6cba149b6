"""`pageant bench throughput` on a tiny checkpoint: every side does the same work.

The Hugging Face baselines (static ``generate`` batches and transformers' continuous batching) on
the CPU, the ``--baseline`` parsing, and the CLI end to end with both baselines.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import pytest
import torch

from pageant.engine.bench import cli
from pageant.engine.bench.hf_baselines import hf_continuous, hf_static
from pageant.engine.bench.throughput import count_parameters, make_requests

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from pageant.engine.testing import build_checkpoint

    path = build_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", arch="llama", seed=0, **TINY)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_hf_continuous_batching_generates_exactly_each_requests_tokens_on_cpu(tiny):
    path, model = tiny
    reqs = make_requests(5, (3, 30), (1, 9), TINY["vocab_size"], seed=0)
    assert len({n for _, n in reqs}) > 1  # the lengths differ: each request's own max_new_tokens counts
    res = hf_continuous(model, reqs, keep_tokens=True, max_batch_tokens=32)  # chunked prefill too
    assert res["complete"] and res["exact_lengths"] and not res["errors"], res
    assert [len(t) for t in res["tokens"]] == [n for _, n in reqs]
    assert res["output_tokens"] == res["expected_tokens"] == sum(n for _, n in reqs)
    assert res["cb_config"]["block_size"] == 16 and res["cb_config"]["max_batch_tokens"] == 32
    assert res["output_tokens_per_s"] > 0 and res["cuda_graph_warmup"] is False
    # greedy, float32: the same tokens as `generate` one request at a time
    for (ids, n), tokens in zip(reqs, res["tokens"]):
        ref = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)[0, len(ids):]
        assert tokens == ref.tolist()
    assert model.config._attn_implementation == "sdpa"  # the manager gives the model back as it was
    static = hf_static(model, reqs, 2)
    assert static["output_tokens"] == res["output_tokens"] and static["peak_kv_tokens"] > 0
    assert count_parameters(path) == sum(p.numel() for p in model.parameters())


def test_hf_baselines_reject_bad_input(tiny):
    _, model = tiny
    with pytest.raises(ValueError, match="batch_size"):
        hf_static(model, [([20, 21], 2)], 0)
    with pytest.raises(ValueError, match="output length"):
        hf_continuous(model, [([20, 21], 0)])
    with pytest.raises(ValueError, match="num_blocks"):
        hf_continuous(model, [([20, 21], 2)], num_blocks=0)


def _parse(*argv):
    parser = argparse.ArgumentParser()
    cli._throughput_parser(parser.add_subparsers(dest="which"))
    return parser.parse_args(["throughput", *argv])


def test_baseline_flag(capsys):
    assert _parse().baseline == ["hf"]  # today's command keeps its meaning
    assert _parse("--baseline", "hf,hf-cb").baseline == ["hf", "hf-cb"]
    assert _parse("--baseline", "hf-cb, hf,hf-cb").baseline == ["hf-cb", "hf"]
    assert _parse("--baseline", "none").baseline == []
    assert _parse("--build-size", "24m", "--hf-batch-sizes", "8,16,48").hf_batch_sizes == [8, 16, 48]
    for bad, message in (("hf,vllm", "unknown baseline vllm: choose from hf, hf-cb, none"),
                         ("none,hf", "baseline none runs Pageant only"), (",", "unknown baseline")):
        with pytest.raises(SystemExit) as exc:
            cli.main(["throughput", "--baseline", bad])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["throughput", "--hf-batch-sizes", "8,0"])
    assert "batch sizes must be integers >= 1" in capsys.readouterr().err


def test_24m_shape_has_about_24m_parameters():
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LlamaConfig(
            hidden_size=512, intermediate_size=1536, num_hidden_layers=5, num_attention_heads=8,
            num_key_value_heads=4, vocab_size=8192, tie_word_embeddings=False))
    assert 23.5e6 < sum(p.numel() for p in model.parameters()) < 24.5e6
    with pytest.raises(ValueError, match="unknown --build-size"):
        cli.build_bench_checkpoint(None, "7b")


def test_bench_throughput_cli(tmp_path):
    out_dir = tmp_path / "results"
    cmd = [sys.executable, "-m", "pageant.cli", "bench", "throughput", "--build-size", "tiny",
           "--num-prompts", "6", "--input-len", "4:40", "--output-len", "2:12", "--hf-batch-sizes", "2,4",
           "--baseline", "hf,hf-cb", "--max-num-seqs", "4", "--threads", "1", "--save-result",
           "--result-dir", str(out_dir), "--label", "t", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch threads: 1" in proc.stdout and "parameters (0.2M)" in proc.stdout
    assert "ratio pageant / best HF static (hf_batch" in proc.stdout
    assert "ratio pageant / HF continuous batching" in proc.stdout and "hf continuous batching" in proc.stdout
    report = json.loads((out_dir / "t.json").read_text())
    assert (out_dir / "t.png").stat().st_size > 10_000
    assert report["baselines"] == ["hf", "hf-cb"] and report["meta"]["device"] == "cpu (1 threads)"
    requested = report["pageant"]["output_tokens"]
    assert requested >= 6 * 2
    # identical useful work on every side: every request got exactly its output length
    assert [h["batch_size"] for h in report["hf"]] == [2, 4]
    assert all(h["output_tokens"] == requested for h in report["hf"])
    cb = report["hf_cb"]
    assert cb["output_tokens"] == cb["expected_tokens"] == requested and cb["exact_lengths"] and cb["complete"]
    assert cb["cb_config"]["max_batch_tokens"] == 2048 and cb["cb_config"]["max_requests_per_batch"] == 4
    assert report["best_hf"] in {h["name"] for h in report["hf"]}
    best = max(report["hf"], key=lambda h: h["output_tokens_per_s"])
    assert report["ratio_vs_best_hf"] == report["pageant"]["output_tokens_per_s"] / best["output_tokens_per_s"]
    assert report["ratio_vs_hf_cb"] == report["pageant"]["output_tokens_per_s"] / cb["output_tokens_per_s"]
    kv = report["kv_memory_mib"]
    assert 0 < kv["pageant_used_peak_mib"] <= kv["pageant_pool_allocated_mib"]
    assert 0 < kv["hf_cb_pool_allocated_mib"] <= kv["pageant_pool_allocated_mib"]
    assert report["pageant"]["peak_running_requests"] <= 4
    assert report["num_parameters"] > 0
