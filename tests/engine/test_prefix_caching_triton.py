"""Prefix caching on the Triton kernels (Triton's CPU interpreter): cached blocks, including ones
written earlier in the same step, give the torch backend's tokens without caching.

Runs in a subprocess because ``TRITON_INTERPRET`` must be set before triton is imported.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
from pageant.engine import LLM, SamplingParams
shared = [1] + list(range(10, 27))  # 18 tokens: 2 full blocks of 8
prompts = [{"prompt_token_ids": shared + tail} for tail in ([40, 41, 42], [50, 51], [60])]
sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
result = {}
for name, backend, caching in (("triton", "triton", True), ("torch", "torch", False)):
    llm = LLM(model=sys.argv[1], attention_backend=backend, block_size=8, enable_prefix_caching=caching)
    together = llm.generate(prompts, sp, use_tqdm=False)  # one step: prompts 2, 3 share prompt 1's blocks
    again = llm.generate(prompts[:1], sp, use_tqdm=False)  # from the cache, a later step
    result[name] = [o.outputs[0].token_ids for o in together + again]
    stats = llm.stats()
    assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"]
    result[name + "_hits"] = stats["prefix_cache_hits"]
print(json.dumps(result))
"""


def test_triton_backend_with_prefix_caching_matches_torch(make_checkpoint, run_interpreted):
    result = run_interpreted(SCRIPT, make_checkpoint("qwen3"))
    assert result["triton"] == result["torch"]
    assert all(len(t) == 3 for t in result["torch"])
    assert result["triton_hits"] == 3 * 16 and result["torch_hits"] == 0
