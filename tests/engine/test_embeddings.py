"""Embeddings from the pooling runner equal Hugging Face's (``AutoModel`` last hidden state with
the same pooling and normalisation): cosine >= 0.9999 for Llama- and Qwen3-shaped checkpoints with
every pooling type, single and batched, chunked, prefix-cached and preempted; the pooler comes
from the sentence-transformers files; Matryoshka dimensions; clear errors."""

from __future__ import annotations

import json
import pathlib
import random
import shutil

import pytest
import torch
import torch.nn.functional as F

from pageant.engine import LLM, InvalidRequestError, PoolingParams, SamplingParams


def inputs(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, 500) for _ in range(rng.randrange(2, 60))] for _ in range(n)]


def hf_embeddings(path: str, prompts: list[list[int]], pooling: str, normalize: bool) -> list[torch.Tensor]:
    from transformers import AutoModel

    model = AutoModel.from_pretrained(path, dtype=torch.float32)
    outs = []
    with torch.no_grad():
        for ids in prompts:
            h = model(torch.tensor([ids])).last_hidden_state[0]  # [tokens, hidden]
            v = {"LAST": h[-1], "MEAN": h.mean(0), "CLS": h[0]}[pooling]
            outs.append(F.normalize(v, dim=-1) if normalize else v)
    return outs


def assert_close(ours, theirs) -> None:
    for a, b in zip(ours, theirs):
        a = torch.tensor(a.outputs.embedding)
        assert a.shape == b.shape
        assert F.cosine_similarity(a, b, dim=0) >= 0.9999
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("pooling,normalize", [("LAST", True), ("MEAN", True), ("CLS", False), ("MEAN", False)])
def test_embeddings_equal_transformers(make_checkpoint, arch, pooling, normalize):
    path = make_checkpoint(arch)
    ps = inputs(12)
    expected = hf_embeddings(path, ps, pooling, normalize)
    config = {"pooling_type": pooling, "normalize": normalize}
    llm = LLM(model=path, runner="pooling", pooler_config=config)
    assert_close(llm.embed({"prompt_token_ids": ps[3]}, use_tqdm=False), expected[3:4])
    assert_close(llm.embed([{"prompt_token_ids": p} for p in ps], use_tqdm=False), expected)
    # chunked prefill (a budget below most inputs), a pool small enough to preempt, prefix caching
    for kwargs in (dict(max_num_batched_tokens=16, block_size=4), dict(num_kv_blocks=8, block_size=8, max_num_seqs=8),
                   dict(enable_prefix_caching=True, block_size=8)):
        other = LLM(model=path, runner="pooling", pooler_config=config, **kwargs)
        assert_close(other.embed([{"prompt_token_ids": p} for p in ps], use_tqdm=False), expected)
        assert_close(other.embed([{"prompt_token_ids": p} for p in ps], use_tqdm=False), expected)  # cache warm
        stats = other.stats()
        assert stats["num_free_kv_blocks"] == stats["num_kv_blocks"] and stats["embedding_requests_total"] == 24


def test_prefix_cache_serves_last_token_pooling(make_checkpoint):
    path = make_checkpoint("qwen3")
    ps = inputs(6, 1)
    shared = [ps[0] + p[1:] for p in ps]  # one shared prefix
    llm = LLM(model=path, runner="pooling", enable_prefix_caching=True, block_size=8)
    first = llm.embed([{"prompt_token_ids": p} for p in shared], use_tqdm=False)
    assert llm.stats()["prefix_cache_hits"] > 0
    assert_close(first, hf_embeddings(path, shared, "LAST", True))


def test_sentence_transformers_files_choose_the_pooler(make_checkpoint, tmp_path):
    src = pathlib.Path(make_checkpoint("llama"))
    dst = tmp_path / "st"
    shutil.copytree(src, dst)
    (dst / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (dst / "1_Pooling").mkdir()
    (dst / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 64, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
         "pooling_mode_max_tokens": False, "pooling_mode_lasttoken": False}))
    ps = inputs(3, 2)
    llm = LLM(model=str(dst), runner="pooling")
    assert (llm.engine.pooler.pooling_type, llm.engine.pooler.normalize) == ("MEAN", False)  # no Normalize module
    assert_close(llm.embed([{"prompt_token_ids": p} for p in ps], use_tqdm=False), hf_embeddings(str(dst), ps, "MEAN", False))
    # the default without sentence-transformers files: last token, normalised (Qwen3-Embedding style)
    assert LLM(model=str(src), runner="pooling").engine.pooler.pooling_type == "LAST"
    # an override wins over the files
    assert LLM(model=str(dst), runner="pooling", pooler_config={"pooling_type": "cls"}).engine.pooler.pooling_type == "CLS"


def test_matryoshka_dimensions(make_checkpoint, tmp_path):
    src = pathlib.Path(make_checkpoint("llama"))
    llm = LLM(model=str(src), runner="pooling")
    with pytest.raises(InvalidRequestError, match="Matryoshka"):
        llm.embed("hello", PoolingParams(dimensions=16), use_tqdm=False)
    dst = tmp_path / "mrl"
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, "matryoshka_dimensions": [16, 32, 64]}))
    mrl = LLM(model=str(dst), runner="pooling")
    full = torch.tensor(mrl.embed("hello world", use_tqdm=False)[0].outputs.embedding)
    short = torch.tensor(mrl.embed("hello world", PoolingParams(dimensions=16), use_tqdm=False)[0].outputs.embedding)
    assert short.shape == (16,) and torch.allclose(short, F.normalize(full[:16], dim=0), atol=1e-6)
    with pytest.raises(InvalidRequestError, match="dimensions must be one of"):
        mrl.embed("hello", PoolingParams(dimensions=20), use_tqdm=False)


def test_runner_mismatch_and_bad_inputs(make_checkpoint):
    path = make_checkpoint("llama")
    pooling = LLM(model=path, runner="pooling", max_model_len=64)
    with pytest.raises(InvalidRequestError, match="pooling runner"):
        pooling.generate("hello", SamplingParams(max_tokens=2), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="context"):
        pooling.embed({"prompt_token_ids": [1] * 65}, use_tqdm=False)
    assert len(pooling.embed({"prompt_token_ids": [1] * 64}, use_tqdm=False)[0].outputs.embedding) == 64  # fits exactly
    with pytest.raises(InvalidRequestError, match="runner='pooling'"):
        LLM(model=path).embed("hello", use_tqdm=False)
    for bad in (dict(dimensions=0), dict(dimensions=True), dict(normalize="yes")):
        with pytest.raises(ValueError):
            PoolingParams(**bad)
    with pytest.raises(ValueError, match="pooling_type"):
        LLM(model=path, runner="pooling", pooler_config={"pooling_type": "MAX"})
    with pytest.raises(ValueError, match="unknown pooler config keys"):
        LLM(model=path, runner="pooling", pooler_config={"pooling": "MEAN"})
