"""Compile the wrappers' real kernel launches for a GPU (sm_90) on a machine without one.

Triton ships ``ptxas`` and ``cuobjdump``, so the full GPU pipeline (TTIR -> PTX -> cubin) runs on
the CPU. This module calls each public wrapper on CPU tensors with its kernels swapped for
recorders, turns every recorded launch into the signature Triton's JIT would build for it on a GPU
(pointer/int types, 16-divisibility of pointers and ints, ints equal to 1 as constants), compiles
it for the target, and reads the resource usage (registers, spill stack, shared memory) and the
instruction mix of the SASS. It catches what the interpreter cannot: code the GPU compiler
rejects, register spills, scalar instead of 16-byte loads, missing tensor-core instructions.

    python -m pageant.kernels.compile_check          # a table for the standard launches
    python -m pageant.kernels.compile_check --json   # the same as JSON

Needs ``TRITON_INTERPRET`` unset (the kernels must be decorated for the GPU, not the interpreter).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from pageant.kernels import attention_decode, attention_prefill, cache_ops, moe, norm_ops, rotary_ops, triton_ops

KERNEL_MODULES = {
    attention_decode: ("_decode_kernel", "_decode_reduce_kernel"),
    attention_prefill: ("_prefill_kernel",),
    cache_ops: ("_reshape_and_cache_kernel",),
    norm_ops: ("_rms_norm_kernel",),
    rotary_ops: ("_rotary_kernel",),
    moe: ("_moe_gemm_kernel",),
}
_TRITON_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.int32: "i32", torch.int64: "i64", torch.float8_e4m3fn: "fp8e4nv",
}
SASS_OPS = re.compile(r"\b((?:LDG|STG|LDGSTS|LDL|STL|HMMA|HGMMA|UTMALDG)[.\w]*)")


@dataclasses.dataclass
class Launch:
    """One recorded kernel launch: the kernel and the arguments the wrapper passed."""

    label: str
    kernel: object  # triton JITFunction
    args: tuple
    kwargs: dict


@dataclasses.dataclass
class CompiledLaunch:
    """Resource usage and instruction mix of one launch compiled for ``arch``."""

    label: str
    kernel: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int
    stack_bytes: int  # > 0 means registers spilled to local memory
    shared_bytes: int
    sass_ops: dict[str, int]

    @property
    def vector_global_loads(self) -> int:
        """16-byte global loads (plain or cp.async)."""
        return sum(n for op, n in self.sass_ops.items() if op.startswith(("LDG", "LDGSTS")) and op.endswith(".128"))

    @property
    def tensor_core_ops(self) -> int:
        return sum(n for op, n in self.sass_ops.items() if op.startswith(("HMMA", "HGMMA")))


class _Recorder:
    def __init__(self, kernel, sink: list, label: str) -> None:
        self.kernel, self.sink, self.label = kernel, sink, label

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.label, self.kernel, args, kwargs))

        return launch


@contextlib.contextmanager
def record_launches(sink: list, label: str):
    """Within the block, the wrappers append their launches to ``sink`` instead of running them."""
    if any(not isinstance(getattr(m, n), triton.runtime.JITFunction) for m, names in KERNEL_MODULES.items() for n in names):
        raise RuntimeError("the kernels were decorated for the interpreter: unset TRITON_INTERPRET")
    saved = []
    try:
        for module, names in KERNEL_MODULES.items():
            saved.append((module, "check_device", module.check_device))
            module.check_device = lambda *tensors: None  # CPU tensors stand in for GPU ones
            for name in names:
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, _Recorder(getattr(module, name), sink, label))
        yield sink
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def _signature(launch: Launch):
    """(signature, constants, attrs, options) as Triton's JIT would specialise this launch on a GPU."""
    fn = launch.kernel
    options = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
    values = dict(zip(fn.arg_names, launch.args))
    values.update({k: v for k, v in launch.kwargs.items() if k not in options})
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = values[name]
        if fn.params[i].is_constexpr:
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{fn.__name__}: unsupported argument {name}={value!r}")
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif fn.params[i].do_not_specialize:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
        elif value == 1:
            signature[name], constants[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constants, attrs, options


def compile_launch(launch: Launch, arch: int = 90) -> CompiledLaunch:
    """Compile one recorded launch for ``sm_<arch>`` and read its cubin's resources and SASS."""
    signature, constants, attrs, options = _signature(launch)
    src = ASTSource(launch.kernel, signature, constants, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "kernel.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-sass", cubin],
                              capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output:\n{usage}")
    return CompiledLaunch(
        label=launch.label, kernel=launch.kernel.__name__, arch=arch,
        num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
        registers=int(found[1]), stack_bytes=int(found[2]), shared_bytes=compiled.metadata.shared,
        sass_ops=dict(collections.Counter(SASS_OPS.findall(sass))),
    )


def standard_launches() -> list[Launch]:
    """The launches a Llama-3.1-8B-shaped model makes (32/8 heads, head_dim 128, hidden 4096), in
    bf16 and fp32 (attention in fp16 too), plus bf16 attention with head_dim 64, 80 (padded to
    128) and 256; decode both with and without split-K; Gemma-2-shaped windowed, soft-capped
    attention; Mixtral-8x7B-shaped MoE grouped GEMMs at decode and prefill batch sizes."""
    launches: list[Launch] = []
    for dtype, tag in ((torch.bfloat16, "bf16"), (torch.float16, "fp16"), (torch.float32, "fp32")):
        for heads, kv_heads, head_dim in ((32, 8, 128), (32, 8, 64), (32, 8, 80), (8, 4, 256)):
            if dtype != torch.bfloat16 and head_dim != 128:
                continue
            shape = f"{tag} h{heads}/{kv_heads} d{head_dim}"
            cache = torch.zeros(64, 16, kv_heads, head_dim, dtype=dtype)
            tables = torch.zeros(4, 512, dtype=torch.int32)  # a wide table: 8192-token contexts
            lens = torch.full((4,), 1000, dtype=torch.int32)
            with record_launches(launches, f"decode {shape}"):
                triton_ops.paged_attention_decode(torch.zeros(4, heads, head_dim, dtype=dtype), cache, cache, tables, lens, 0.1)
            with record_launches(launches, f"decode split-K {shape}"):
                attention_decode.decode_attention(torch.zeros(4, heads, head_dim, dtype=dtype), cache, cache, tables, lens, 0.1,
                                                  num_splits=8)
            qsl = torch.tensor([0, 300, 301, 700, 1000], dtype=torch.int32)
            with record_launches(launches, f"prefill {shape}"):
                triton_ops.paged_attention_prefill(torch.zeros(1000, heads, head_dim, dtype=dtype), cache, cache, tables, qsl, lens, 0.1)
            if head_dim == 128 and dtype != torch.float16:  # fp16 element-wise code is bf16's with other casts
                kv = torch.zeros(8, kv_heads, head_dim, dtype=dtype)
                with record_launches(launches, f"reshape_and_cache {shape}"):
                    triton_ops.reshape_and_cache(kv, kv, cache, cache, torch.zeros(8, dtype=torch.int64))
                with record_launches(launches, f"rotary {shape}"):
                    triton_ops.rotary_embedding(torch.zeros(8, dtype=torch.int64), torch.zeros(8, heads, head_dim, dtype=dtype),
                                                kv, torch.zeros(64, head_dim))
        if dtype == torch.float16:
            continue
        x = torch.zeros(8, 4096, dtype=dtype)
        with record_launches(launches, f"rms_norm {tag} 4096"):
            triton_ops.rms_norm(x, torch.zeros(4096, dtype=dtype), 1e-5)
        with record_launches(launches, f"fused_add_rms_norm {tag} 4096"):
            triton_ops.fused_add_rms_norm(x, x, torch.zeros(4096, dtype=dtype), 1e-5)
    launches += _gemma2_and_mixtral_launches()
    launches += fp8_kv_launches()
    return launches


def _gemma2_and_mixtral_launches() -> list[Launch]:
    """Gemma 2 9B attention (16/8 heads, head_dim 256, window 4096, soft cap 50) and Mixtral 8x7B
    experts (8 of intermediate 14336, top 2, hidden 4096) at 4 and 512 tokens, in bf16."""
    launches: list[Launch] = []
    dtype, opts = torch.bfloat16, {"sliding_window": 4096, "logits_soft_cap": 50.0}
    cache = torch.zeros(64, 16, 8, 256, dtype=dtype)
    tables, lens = torch.zeros(4, 512, dtype=torch.int32), torch.full((4,), 1000, dtype=torch.int32)
    with record_launches(launches, "decode window+cap bf16 h16/8 d256"):
        triton_ops.paged_attention_decode(torch.zeros(4, 16, 256, dtype=dtype), cache, cache, tables, lens, 0.0625, **opts)
    qsl = torch.tensor([0, 300, 301, 700, 1000], dtype=torch.int32)
    with record_launches(launches, "prefill window+cap bf16 h16/8 d256"):
        triton_ops.paged_attention_prefill(torch.zeros(1000, 16, 256, dtype=dtype), cache, cache, tables, qsl, lens,
                                           0.0625, **opts)
    # never read (launches are recorded, not run): empty, so the 2.8 GB of pages are never touched
    w13, w2 = torch.empty(8, 2 * 14336, 4096, dtype=dtype), torch.empty(8, 4096, 14336, dtype=dtype)
    for tokens in (4, 512):
        ids = torch.arange(2 * tokens, dtype=torch.int32).reshape(tokens, 2) % 8
        with record_launches(launches, f"moe bf16 8x14336 top2 t{tokens}"):
            triton_ops.fused_moe(torch.zeros(tokens, 4096, dtype=dtype), w13, w2, torch.full((tokens, 2), 0.5), ids)
    return launches


def fp8_kv_launches() -> list[Launch]:
    """The attention and cache-write launches of a Llama-3.1-8B shape (32/8 heads, head_dim 128) and
    Gemma 2's windowed, soft-capped d256 one over an FP8 (``float8_e4m3fn``) KV cache, with bf16 and
    fp32 queries (labels start with "fp8-kv")."""
    launches: list[Launch] = []
    fp8, scale = torch.float8_e4m3fn, torch.ones(())
    tables, lens = torch.zeros(4, 512, dtype=torch.int32), torch.full((4,), 1000, dtype=torch.int32)
    qsl = torch.tensor([0, 300, 301, 700, 1000], dtype=torch.int32)
    shapes = [(torch.bfloat16, 32, 8, 128, {}), (torch.float32, 32, 8, 128, {}),
              (torch.bfloat16, 16, 8, 256, {"sliding_window": 4096, "logits_soft_cap": 50.0})]
    for dtype, heads, kv_heads, head_dim, opts in shapes:
        tag = f"{_TRITON_TYPES[dtype]} h{heads}/{kv_heads} d{head_dim}" + (" window+cap" if opts else "")
        cache = torch.zeros(64, 16, kv_heads, head_dim, dtype=fp8)
        scales = {"k_scale": scale, "v_scale": scale}
        with record_launches(launches, f"fp8-kv decode {tag}"):
            triton_ops.paged_attention_decode(torch.zeros(4, heads, head_dim, dtype=dtype), cache, cache, tables, lens,
                                              0.1, **opts, **scales)
        with record_launches(launches, f"fp8-kv decode split-K {tag}"):
            attention_decode.decode_attention(torch.zeros(4, heads, head_dim, dtype=dtype), cache, cache, tables, lens,
                                              0.1, num_splits=8, **opts, **scales)
        with record_launches(launches, f"fp8-kv prefill {tag}"):
            triton_ops.paged_attention_prefill(torch.zeros(1000, heads, head_dim, dtype=dtype), cache, cache, tables,
                                               qsl, lens, 0.1, **opts, **scales)
        if not opts:
            kv = torch.zeros(8, kv_heads, head_dim, dtype=dtype)
            with record_launches(launches, f"fp8-kv reshape_and_cache {tag}"):
                triton_ops.reshape_and_cache(kv, kv, cache, cache, torch.zeros(8, dtype=torch.int64), **scales)
    return launches


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="compile the kernels' standard launches for a GPU target")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for H100/H200")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    results = [compile_launch(launch, args.arch) for launch in standard_launches()]
    if args.json:
        print(json.dumps([dataclasses.asdict(r) | {"vector_global_loads": r.vector_global_loads,
                                                   "tensor_core_ops": r.tensor_core_ops} for r in results]))
        return 0
    print(f"{'launch':<40} {'kernel':<26} {'warps':>5} {'stages':>6} {'regs':>4} {'spill':>5} {'smem':>6} {'ld128':>5} {'mma':>4}")
    for r in results:
        print(f"{r.label:<40} {r.kernel:<26} {r.num_warps:>5} {r.num_stages:>6} {r.registers:>4} {r.stack_bytes:>5}"
              f" {r.shared_bytes:>6} {r.vector_global_loads:>5} {r.tensor_core_ops:>4}")
    return 0


if __name__ == "__main__":
    sys.exit(main())


# --- quantized GEMMs (kernels/quant_gemm.py) --------------------------------------------------------
# Kept out of ``standard_launches`` (its kernel set is pinned by tests/kernels/test_compile_sm90.py):
#
#     python -c "import sys; from pageant.kernels.compile_check import quant_main; sys.exit(quant_main())"
#
# (``--json`` as for ``main``). Definitions sit after the ``__main__`` guard, so ``python -m`` of this
# module is unchanged.

from pageant.kernels import quant_gemm  # noqa: E402

KERNEL_MODULES[quant_gemm] = ("_dequant_gemm_kernel", "_group_quant_fp8_kernel", "_w8a8_block_fp8_kernel")
_TRITON_TYPES.update({torch.float8_e4m3fn: "fp8e4nv", torch.uint8: "u8", torch.int8: "i8"})


def quant_gemm_launches() -> list[tuple[Launch, int]]:
    """(launch, arch) for Llama-3.1-8B-shaped quantized linear layers in bf16 (hidden 4096, q/k/v
    6144, gate/up 2 x 14336, down 14336 -> 4096) at decode (4 tokens) and prefill (512 tokens):
    W4A16 group 128 (compressed-tensors, GPTQ, act-order g_idx), W4A16 group 32, W8A16 channel,
    FP8 weight-only per channel and 128 x 128 blocks (also for sm_80, its pre-FP8 fallback),
    dynamic FP8 activation quantization per 128-group and per token, and the block-FP8 W8A8 GEMM."""
    launches: list[tuple[Launch, int]] = []
    bf16 = torch.bfloat16

    def add(label: str, fn, *args, arch: int = 90, **kwargs) -> None:
        found: list[Launch] = []
        with record_launches(found, label):
            fn(*args, **kwargs)
        launches.extend((launch, arch) for launch in found)

    def int_weight(n: int, k: int, bits: int, groups: int, dtype=bf16):
        return (torch.empty(n, k * bits // 32, dtype=torch.int32), torch.empty(n, groups, dtype=dtype))

    x_dec, x_pre = torch.zeros(4, 4096, dtype=bf16), torch.zeros(512, 4096, dtype=bf16)
    x_down = torch.zeros(4, 14336, dtype=bf16)
    qw, s = int_weight(28672, 4096, 4, 32)
    add("w4a16 g128 ct bf16 gate_up t4", quant_gemm.dequant_gemm, x_dec, qw, s, bits=4, group_size=128, zero_offset=8)
    qw, s = int_weight(6144, 4096, 4, 32)
    z = torch.empty(6144, 32, dtype=torch.uint8)
    add("w4a16 g128 gptq bf16 qkv t512", quant_gemm.dequant_gemm, x_pre, qw, s, bits=4, group_size=128, zeros=z)
    for dtype, tag, tokens in ((torch.float16, "fp16", 4), (torch.float32, "fp32", 512)):
        qw, s = int_weight(6144, 4096, 4, 32, dtype)
        add(f"w4a16 g128 gptq {tag} qkv t{tokens}", quant_gemm.dequant_gemm,
            torch.zeros(tokens, 4096, dtype=dtype), qw, s, bits=4, group_size=128, zeros=z)
    qw, s = int_weight(6144, 4096, 4, 128)
    add("w4a16 g32 gptq bf16 qkv t512", quant_gemm.dequant_gemm, x_pre, qw, s, bits=4, group_size=32,
        zeros=torch.empty(6144, 128, dtype=torch.uint8))
    qw, s = int_weight(4096, 14336, 4, 112)
    add("w4a16 act-order bf16 down t4", quant_gemm.dequant_gemm, x_down, qw, s, bits=4, group_size=128,
        zeros=torch.empty(4096, 112, dtype=torch.uint8), g_idx=torch.zeros(14336, dtype=torch.int32))
    qw, s = int_weight(4096, 14336, 8, 1)
    add("w8a16 channel ct bf16 down t4", quant_gemm.dequant_gemm, x_down, qw, s, bits=8, group_size=-1,
        zero_offset=128)
    w = torch.empty(28672, 4096, dtype=torch.float8_e4m3fn)
    for arch in (90, 80):
        add(f"fp8 w8a16 channel bf16 gate_up t4 sm{arch}", quant_gemm.fp8_w8a16_gemm, x_dec, w,
            torch.empty(28672, 1, dtype=bf16), arch=arch)
    w_down, bs_down = torch.empty(4096, 14336, dtype=torch.float8_e4m3fn), torch.empty(32, 112)
    add("fp8 w8a16 block128 bf16 down t512", quant_gemm.fp8_w8a16_gemm, torch.zeros(512, 14336, dtype=bf16), w_down,
        bs_down, block_size=(128, 128))
    add("fp8 group quant 128 bf16 t512", quant_gemm.per_token_group_quant_fp8, x_pre, 128)
    add("fp8 token quant bf16 down t4", quant_gemm.per_token_group_quant_fp8, x_down, 14336)
    for tokens in (4, 512):
        xq, xs = torch.empty(tokens, 14336, dtype=torch.float8_e4m3fn), torch.empty(tokens, 112)
        add(f"w8a8 block128 fp8 bf16 down t{tokens}", quant_gemm.w8a8_block_fp8_matmul, xq, xs, w_down, bs_down,
            (128, 128), out_dtype=bf16)
    return launches


def quant_main(argv=None) -> int:
    """``main`` for ``quant_gemm_launches`` (each at its own arch)."""
    parser = argparse.ArgumentParser(description="compile the quantized-GEMM kernels' launches for GPU targets")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    results = [compile_launch(launch, arch) for launch, arch in quant_gemm_launches()]
    if args.json:
        print(json.dumps([dataclasses.asdict(r) | {"vector_global_loads": r.vector_global_loads,
                                                   "tensor_core_ops": r.tensor_core_ops} for r in results]))
        return 0
    print(f"{'launch':<40} {'kernel':<26} {'sm':>3} {'warps':>5} {'stages':>6} {'regs':>4} {'spill':>5} {'smem':>6} "
          f"{'ld128':>5} {'mma':>4}")
    for r in results:
        print(f"{r.label:<40} {r.kernel:<26} {r.arch:>3} {r.num_warps:>5} {r.num_stages:>6} {r.registers:>4}"
              f" {r.stack_bytes:>5} {r.shared_bytes:>6} {r.vector_global_loads:>5} {r.tensor_core_ops:>4}")
    return 0
