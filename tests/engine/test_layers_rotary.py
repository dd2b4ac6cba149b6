"""``pageant.engine.layers.rotary`` against Hugging Face transformers itself.

The frequency tables (``inv_frequencies``, ``attention_factor``, ``cos_sin_cache``) are compared to
``transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS`` and to each model's ``RotaryEmbedding``
forward, bit for bit (``torch.equal``): our code takes the same float32 steps as transformers. The
``RopeConfig`` always comes from ``pageant.engine.config.rope_config`` of the HF config's dict, in
the transformers-5 ``rope_parameters`` layout and in the older ``rope_theta`` + ``rope_scaling``
layout, so the parsing is checked too. ``RotaryEmbedding.forward`` is compared to the models' own
``apply_rotary_pos_emb`` (Llama full rotary, GPT-NeoX partial rotary, GPT-J interleaved pairs).
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.gpt_neox import modeling_gpt_neox as hf_neox
from transformers.models.gptj import modeling_gptj as hf_gptj
from transformers.models.llama import modeling_llama as hf_llama
from transformers.models.phi3 import modeling_phi3 as hf_phi3

from pageant.engine.config import RopeConfig, partial_rotary_factor, rope_config
from pageant.engine.layers.rotary import RotaryEmbedding, attention_factor, cos_sin_cache, inv_frequencies
from pageant.kernels import get_ops

TORCH_OPS = get_ops("torch")
HEAD_DIM = 32
MPE = 256  # max_position_embeddings


def llama_config(params: dict, layout: str, head_dim: int = HEAD_DIM, mpe: int = MPE):
    """(HF LlamaConfig, the dict our parser reads) for rope ``params`` in the given layout."""
    params = dict(params)
    common = dict(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim, max_position_embeddings=mpe)
    if layout == "new":
        hf = transformers.LlamaConfig(rope_parameters=dict(params), **common)
        return hf, hf.to_dict()
    theta = params.pop("rope_theta")
    scaling = dict(params)
    if scaling.get("rope_type", "default") == "default":
        hf = transformers.LlamaConfig(rope_theta=theta, **common)
        return hf, {**common, "rope_theta": theta}
    # old checkpoints spell the key "type" (and HF itself still accepts it)
    scaling["type"] = scaling.pop("rope_type")
    hf = transformers.LlamaConfig(rope_theta=theta, rope_scaling=dict(scaling), **common)
    return hf, {**common, "rope_theta": theta, "rope_scaling": scaling}


def hf_init(hf_config, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    rope_type = hf_config.rope_parameters["rope_type"]
    if rope_type == "default":
        return hf_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(hf_config)
    kwargs = {} if seq_len is None else {"seq_len": seq_len}
    return ROPE_INIT_FUNCTIONS[rope_type](hf_config, None, **kwargs)


def hf_cos_sin(rotary_cls, hf_config, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``rotary_cls(config)(x, position_ids)`` -> cos, sin of shape [num_positions, rotary_dim] (float32)."""
    rotary = rotary_cls(hf_config)
    x = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary(x, positions[None])
    return cos[0], sin[0]


def assert_table_matches(ours: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Our [P, rd] cos | sin table against HF's [P, rd] cos / sin (each the rd/2 angles twice)."""
    half = ours.shape[1] // 2
    assert torch.equal(cos[:, :half], cos[:, half:]) and torch.equal(sin[:, :half], sin[:, half:])
    assert torch.equal(ours[:, :half], cos[:, :half])
    assert torch.equal(ours[:, half:], sin[:, :half])


ROPE_CASES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "default_500k": {"rope_type": "default", "rope_theta": 500000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "llama3_factors": {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 3.0, "low_freq_factor": 2.0,
                       "high_freq_factor": 8.0, "original_max_position_embeddings": 128},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    "yarn_mscale": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                    "original_max_position_embeddings": 64, "mscale": 1.0, "mscale_all_dim": 0.5},
    "yarn_no_truncate": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 64, "truncate": False},
    "yarn_attention_factor": {"rope_type": "yarn", "rope_theta": 20000.0, "factor": 8.0,
                              "original_max_position_embeddings": 32, "attention_factor": 1.3,
                              "beta_fast": 16.0, "beta_slow": 2.0},
    "yarn_mscale_no_truncate": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 16.0,
                                "original_max_position_embeddings": 16, "mscale": 0.707, "mscale_all_dim": 0.3,
                                "truncate": False},
}


@pytest.mark.parametrize("layout", ["new", "old"])
@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_tables_equal_transformers(case, layout):
    """inv_freq and attention factor equal ROPE_INIT_FUNCTIONS' bit for bit; the cos | sin table equals
    LlamaRotaryEmbedding's forward over every position (dynamic: at max_position = max_position_embeddings)."""
    hf, ours_dict = llama_config(ROPE_CASES[case], layout)
    rope = rope_config(ours_dict)
    expected_type = ROPE_CASES[case]["rope_type"]
    assert rope.rope_type == expected_type and rope.theta == ROPE_CASES[case]["rope_theta"]
    hf_inv, hf_scale = hf_init(hf)
    ours = inv_frequencies(rope, HEAD_DIM, MPE, MPE)
    assert ours.dtype == torch.float32 and ours.shape == (HEAD_DIM // 2,)
    assert torch.equal(ours, hf_inv), (ours - hf_inv).abs().max()
    assert attention_factor(rope, MPE) == hf_scale  # both Python floats from the same formula
    table = cos_sin_cache(rope, HEAD_DIM, MPE, MPE)
    assert table.shape == (MPE, HEAD_DIM)
    cos, sin = hf_cos_sin(hf_llama.LlamaRotaryEmbedding, hf, torch.arange(MPE))
    assert_table_matches(table, cos, sin)


def test_cases_are_not_trivial():
    """Each scaling really changes something, so the equalities above test that scaling's math."""
    base = inv_frequencies(RopeConfig(theta=10000.0), HEAD_DIM, MPE, MPE)
    yarn = {}
    for case in ("yarn", "yarn_mscale", "yarn_no_truncate"):
        _, d = llama_config(ROPE_CASES[case], "new")
        yarn[case] = inv_frequencies(rope_config(d), HEAD_DIM, MPE, MPE)
        assert not torch.equal(yarn[case], base)
    assert not torch.equal(yarn["yarn"], yarn["yarn_no_truncate"])  # truncate moves the ramp ends
    _, d = llama_config(ROPE_CASES["yarn_mscale"], "new")
    assert attention_factor(rope_config(d), MPE) == pytest.approx((0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1))
    _, d = llama_config(ROPE_CASES["yarn"], "new")
    assert attention_factor(rope_config(d), MPE) == pytest.approx(0.1 * math.log(4) + 1)
    # llama3 with these numbers has all three bands: kept, divided by factor, and smoothed between
    _, d = llama_config(ROPE_CASES["llama3"], "new")
    llama3 = inv_frequencies(rope_config(d), HEAD_DIM, MPE, MPE)
    plain = inv_frequencies(RopeConfig(theta=500000.0), HEAD_DIM, MPE, MPE)
    kept, divided = llama3 == plain, torch.isclose(llama3, plain / 8, rtol=1e-6, atol=0)
    assert kept.any() and divided.any() and (~kept & ~divided).any()
    _, d = llama_config(ROPE_CASES["linear"], "new")
    assert torch.equal(inv_frequencies(rope_config(d), HEAD_DIM, MPE, MPE), base / 4)


@pytest.mark.parametrize("layout", ["new", "old"])
def test_dynamic_above_max_position_embeddings_fixes_base_at_table_length(layout):
    """Above max_position_embeddings the NTK base is fixed for the table's length: HF's inv_freq at
    seq_len = table length (transformers recomputes it per batch; a paged engine keeps one table)."""
    hf, d = llama_config(ROPE_CASES["dynamic"], layout)
    rope = rope_config(d)
    max_position = 3 * MPE
    ours = inv_frequencies(rope, HEAD_DIM, MPE, max_position)
    hf_inv, hf_scale = hf_init(hf, seq_len=max_position)
    assert torch.equal(ours, hf_inv)
    assert not torch.equal(ours, hf_init(hf)[0])  # the base did grow
    assert attention_factor(rope, MPE) == hf_scale == 1.0
    # the whole table equals HF's forward over a batch that reaches the table length (positions past MPE
    # make HF regrow its inv_freq with seq_len = max position + 1 = max_position), bit for bit
    table = cos_sin_cache(rope, HEAD_DIM, max_position, MPE)
    cos, sin = hf_cos_sin(hf_llama.LlamaRotaryEmbedding, hf, torch.arange(max_position))
    assert_table_matches(table, cos, sin)
    # ... and differs from the unscaled table beyond the original length (the test can fail)
    plain = cos_sin_cache(RopeConfig(theta=10000.0), HEAD_DIM, max_position)
    assert (table - plain).abs().max() > 1e-2


def phi3_config(layout: str, *, short, long, partial: float = 1.0, mpe: int = 512, original: int = 128,
                extra: dict | None = None):
    common = dict(hidden_size=64, num_attention_heads=2, max_position_embeddings=mpe,
                  original_max_position_embeddings=original)
    if partial != 1.0:
        common["partial_rotary_factor"] = partial
    params = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": list(short), "long_factor": list(long),
              **(extra or {})}
    if layout == "new":
        hf = transformers.Phi3Config(rope_parameters=dict(params), **common)
        return hf, hf.to_dict()
    theta = params.pop("rope_theta")
    params.pop("rope_type")
    scaling = {"type": "longrope", **params}
    hf = transformers.Phi3Config(rope_theta=theta, rope_scaling=dict(scaling), **common)
    return hf, {**common, "rope_theta": theta, "rope_scaling": scaling}


@pytest.mark.parametrize("layout", ["new", "old"])
@pytest.mark.parametrize("partial", [1.0, 0.5])
@pytest.mark.parametrize("extra", [{}, {"attention_factor": 1.25}, {"factor": 2.0}], ids=["derived", "af", "factor"])
def test_longrope_short_then_long_factors(layout, partial, extra):
    """Rows below original_max_position_embeddings use short_factor (HF at seq_len <= original), rows from
    it on use long_factor (HF's inv_freq at seq_len > original), both with HF's attention factor."""
    gen = torch.Generator().manual_seed(7)
    head_dim, original, mpe = 32, 128, 512
    rd = int(head_dim * partial)
    short = (1.0 + torch.rand(rd // 2, generator=gen)).tolist()
    long = (1.0 + 8 * torch.rand(rd // 2, generator=gen)).tolist()
    hf, d = phi3_config(layout, short=short, long=long, partial=partial, extra=extra)
    rope = rope_config(d)
    assert rope.rope_type == "longrope" and rope.original_max_position_embeddings == original
    assert int(head_dim * partial_rotary_factor(d)) == rd
    hf_short, hf_scale = ROPE_INIT_FUNCTIONS["longrope"](hf, None)
    hf_long, hf_scale_long = ROPE_INIT_FUNCTIONS["longrope"](hf, None, seq_len=original + 1)
    assert not torch.equal(hf_short, hf_long)
    assert torch.equal(inv_frequencies(rope, rd, mpe, mpe), hf_short)
    assert torch.equal(inv_frequencies(rope, rd, mpe, mpe, long=True), hf_long)
    assert attention_factor(rope, mpe) == hf_scale == hf_scale_long
    if not extra:
        assert hf_scale == pytest.approx(math.sqrt(1 + math.log(mpe / original) / math.log(original)))
    table = cos_sin_cache(rope, rd, mpe, mpe)
    # HF's Phi3RotaryEmbedding: a batch within the original length gets the short table ...
    cos, sin = hf_cos_sin(hf_phi3.Phi3RotaryEmbedding, hf, torch.arange(original))
    assert_table_matches(table[:original], cos, sin)
    # ... a longer one the long table for all its positions: ours from `original` on
    cos, sin = hf_cos_sin(hf_phi3.Phi3RotaryEmbedding, hf, torch.arange(mpe))
    assert_table_matches(table[original:], cos[original:], sin[original:])
    # a table that stays within the original length is all short
    assert torch.equal(cos_sin_cache(rope, rd, original, mpe), table[:original])


@pytest.mark.parametrize("layout", ["new", "old"])
@pytest.mark.parametrize("factor", [0.25, 0.5])
@pytest.mark.parametrize("case", ["default", "linear", "dynamic", "yarn_mscale"])
def test_partial_rotary_tables(case, factor, layout):
    """partial_rotary_factor: tables of rotary_dim = head_dim * factor features equal GPT-NeoX's
    RotaryEmbedding (which honours the factor) and ROPE_INIT_FUNCTIONS bit for bit."""
    head_dim, mpe = 64, 128
    params = {**ROPE_CASES[case]}
    if "original_max_position_embeddings" in params:
        params["original_max_position_embeddings"] = 32
    common = dict(hidden_size=2 * head_dim, num_attention_heads=2, max_position_embeddings=mpe)
    if layout == "new":
        hf = transformers.GPTNeoXConfig(rope_parameters={**params, "partial_rotary_factor": factor}, **common)
        d = hf.to_dict()
    else:
        theta = params.pop("rope_theta")
        rope_type = params.pop("rope_type")
        scaling = None if rope_type == "default" else {"rope_type": rope_type, **params}
        # GPT-NeoX's own config spells the factor rotary_pct; ours reads the top-level
        # partial_rotary_factor of the older layout (Phi-2 / StableLM style)
        hf = transformers.GPTNeoXConfig(rope_theta=theta, rope_scaling=scaling and dict(scaling),
                                        rotary_pct=factor, **common)
        d = {**common, "rope_theta": theta, "partial_rotary_factor": factor,
             **({"rope_scaling": scaling} if scaling else {})}
    assert hf.rope_parameters["partial_rotary_factor"] == factor
    rd = int(head_dim * partial_rotary_factor(d))
    assert rd == int(head_dim * factor)
    rope = rope_config(d)
    if case == "default":
        hf_inv, hf_scale = hf_neox.GPTNeoXRotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        hf_inv, hf_scale = ROPE_INIT_FUNCTIONS[hf.rope_parameters["rope_type"]](hf, None)
    assert hf_inv.shape == (rd // 2,)
    assert torch.equal(inv_frequencies(rope, rd, mpe, mpe), hf_inv)
    assert attention_factor(rope, mpe) == hf_scale
    table = cos_sin_cache(rope, rd, mpe, mpe)
    cos, sin = hf_cos_sin(hf_neox.GPTNeoXRotaryEmbedding, hf, torch.arange(mpe))
    assert_table_matches(table, cos, sin)


def _random_qk(gen, num_tokens, num_heads, num_kv_heads, head_dim, max_position):
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen)
    k = torch.randn(num_tokens, num_kv_heads, head_dim, generator=gen)
    positions = torch.randint(0, max_position, (num_tokens,), generator=gen)
    return q, k, positions


@pytest.mark.parametrize("case", ["default", "llama3", "yarn_mscale"])
@pytest.mark.parametrize("seed", [0, 1])
def test_forward_full_rotary_equals_llama(case, seed):
    gen = torch.Generator().manual_seed(seed)
    num_tokens = int(torch.randint(1, 24, (1,), generator=gen))
    hf, d = llama_config(ROPE_CASES[case], "new")
    layer = RotaryEmbedding(HEAD_DIM, HEAD_DIM, MPE, rope_config(d), TORCH_OPS, max_position_embeddings=MPE)
    q, k, positions = _random_qk(gen, num_tokens, 4, 2, HEAD_DIM, MPE)
    q_out, k_out = layer(positions, q, k)
    cos, sin = hf_cos_sin(hf_llama.LlamaRotaryEmbedding, hf, positions)  # [n, d]
    # HF layout [batch, heads, tokens, d]; cos [batch, tokens, d] unsqueezed on dim 1
    hq, hk = hf_llama.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    assert torch.equal(q_out, hq[0].transpose(0, 1))
    assert torch.equal(k_out, hk[0].transpose(0, 1))
    assert not torch.equal(q_out, q)


@pytest.mark.parametrize("factor", [0.25, 0.5])
@pytest.mark.parametrize("seed", [0, 1])
def test_forward_partial_neox_equals_gpt_neox(factor, seed):
    gen = torch.Generator().manual_seed(seed)
    head_dim, mpe, num_heads = 64, 128, 3
    hf = transformers.GPTNeoXConfig(hidden_size=num_heads * head_dim, num_attention_heads=num_heads,
                                    max_position_embeddings=mpe,
                                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                     "partial_rotary_factor": factor})
    d = hf.to_dict()
    rd = int(head_dim * partial_rotary_factor(d))
    layer = RotaryEmbedding(head_dim, rd, mpe, rope_config(d), TORCH_OPS)
    q, k, positions = _random_qk(gen, 11, num_heads, num_heads, head_dim, mpe)
    q_out, k_out = layer(positions, q, k)
    cos, sin = hf_cos_sin(hf_neox.GPTNeoXRotaryEmbedding, hf, positions)  # [n, rd]
    assert cos.shape[-1] == rd
    hq, hk = hf_neox.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos[None], sin[None])
    assert torch.equal(q_out, hq[0].transpose(0, 1))
    assert torch.equal(k_out, hk[0].transpose(0, 1))
    assert torch.equal(q_out[..., rd:], q[..., rd:]) and not torch.equal(q_out[..., :rd], q[..., :rd])


@pytest.mark.parametrize("rotary_dim", [16, 32, 64])
@pytest.mark.parametrize("seed", [0, 1])
def test_forward_gptj_interleaved_equals_gptj(rotary_dim, seed):
    """GPT-J pairs features (2i, 2i + 1) (``rotate_every_two``) on the first rotary_dim features."""
    gen = torch.Generator().manual_seed(seed)
    head_dim, mpe, num_heads = 64, 96, 2
    hf = transformers.GPTJConfig(n_embd=num_heads * head_dim, n_head=num_heads, rotary_dim=rotary_dim,
                                 n_positions=mpe)
    layer = RotaryEmbedding(head_dim, rotary_dim, mpe, rope_config({}), TORCH_OPS, is_neox_style=False)
    q, k, positions = _random_qk(gen, 13, num_heads, num_heads, head_dim, mpe)
    q_out, k_out = layer(positions, q, k)
    sin, cos = hf_gptj.GPTJRotaryEmbedding(hf)(q, positions[None])  # [1, n, rd / 2] each

    def hf_apply(x):  # GPTJAttention.forward: [batch, tokens, heads, d], rotary on the first rotary_dim
        x = x[None]
        rot = hf_gptj.apply_rotary_pos_emb(x[..., :rotary_dim], sin, cos)
        return torch.cat([rot, x[..., rotary_dim:]], dim=-1)[0]

    assert torch.equal(q_out, hf_apply(q))
    assert torch.equal(k_out, hf_apply(k))
    # interleaved really differs from rotate-half on the same table
    neox = RotaryEmbedding(head_dim, rotary_dim, mpe, rope_config({}), TORCH_OPS)(positions, q, k)[0]
    assert not torch.allclose(neox, q_out)


@pytest.mark.parametrize("rotary_dim", [16, 32])
def test_triton_partial_rotary_equals_torch(rotary_dim):
    triton_ops = get_ops("triton")
    gen = torch.Generator().manual_seed(3)
    head_dim, mpe = 32, 64
    _, d = llama_config(ROPE_CASES["yarn"], "new", head_dim=head_dim, mpe=mpe)
    rope = rope_config(d)
    q, k, positions = _random_qk(gen, 5, 4, 2, head_dim, mpe)
    ref = RotaryEmbedding(head_dim, rotary_dim, mpe, rope, TORCH_OPS)(positions, q, k)
    out = RotaryEmbedding(head_dim, rotary_dim, mpe, rope, triton_ops)(positions, q, k)
    for a, b in zip(out, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.equal(out[0][..., rotary_dim:], q[..., rotary_dim:])


@pytest.mark.parametrize("rotary_dim", [0, -2, 7, 34, 64])
def test_bad_rotary_dim(rotary_dim):
    with pytest.raises(ValueError, match="rotary_dim"):
        RotaryEmbedding(32, rotary_dim, 16, RopeConfig(), TORCH_OPS)


def test_longrope_wrong_number_of_factors():
    rope = RopeConfig(rope_type="longrope", short_factor=(1.0,) * 8, long_factor=(2.0,) * 8,
                      original_max_position_embeddings=16)
    assert cos_sin_cache(rope, 16, 32).shape == (32, 16)  # 8 factors fit rotary_dim 16
    with pytest.raises(ValueError, match="longrope factors"):
        cos_sin_cache(rope, 32, 32)
    with pytest.raises(ValueError, match="longrope factors"):
        RotaryEmbedding(32, 32, 32, rope, TORCH_OPS)
    bad_long = RopeConfig(rope_type="longrope", short_factor=(1.0,) * 8, long_factor=(2.0,) * 7,
                          original_max_position_embeddings=16)
    cos_sin_cache(bad_long, 16, 16)  # the long factors are only read for a table past the original length
    with pytest.raises(ValueError, match="longrope factors"):
        cos_sin_cache(bad_long, 16, 32)
    with pytest.raises(ValueError, match="short_factor and long_factor"):
        rope_config({"rope_scaling": {"type": "longrope", "short_factor": [1.0]}})
