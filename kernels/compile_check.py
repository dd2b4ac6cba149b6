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
    torch.int32: "i32", torch.int64: "i64",
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
