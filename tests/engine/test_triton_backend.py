"""The engine on the Triton kernels (Triton's CPU interpreter) gives the torch backend's tokens.

Runs in a subprocess because ``TRITON_INTERPRET`` must be set before triton is imported.
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
from pageant.engine import LLM, SamplingParams
prompts = [{"prompt_token_ids": [1] + list(range(10, 10 + k))} for k in (2, 19)]
sp = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
result = {}
for backend in ("triton", "torch"):
    llm = LLM(model=sys.argv[1], attention_backend=backend, block_size=8, max_num_batched_tokens=12)
    result[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert llm.stats()["num_free_kv_blocks"] == llm.stats()["num_kv_blocks"]
print(json.dumps(result))
"""


def test_triton_backend_matches_torch_backend(make_checkpoint, run_interpreted):
    result = run_interpreted(SCRIPT, make_checkpoint("qwen3"))
    assert result["triton"] == result["torch"]
    assert all(len(t) == 3 for t in result["torch"])


FAMILY_SCRIPT = r"""
import json, sys, torch
torch.set_num_threads(1)
from pageant.engine import LLM, SamplingParams
prompts = json.loads(sys.argv[2])
sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
llm = LLM(model=sys.argv[1], attention_backend="triton", block_size=8, max_num_batched_tokens=16)
out = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)]
assert llm.stats()["num_free_kv_blocks"] == llm.stats()["num_kv_blocks"]
print(json.dumps(out))
"""


@pytest.mark.parametrize("arch", ["gemma2", "mixtral"])
def test_triton_backend_matches_transformers_for_new_families(make_checkpoint, hf_greedy, run_interpreted, arch):
    """Gemma 2 through the Triton kernels (sliding window past 32 tokens, soft-capping, chunked
    prefill mixing decodes and prefills) and Mixtral through the grouped-GEMM MoE kernel equal HF."""
    import json

    path = make_checkpoint(arch)
    prompts = [[1] + [(7 * i) % 400 + 3 for i in range(44)], [1, 20, 30, 40, 50]]
    assert run_interpreted(FAMILY_SCRIPT, path, json.dumps(prompts)) == hf_greedy(path, prompts, 4)
