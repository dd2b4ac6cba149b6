"""LoRA kernel cost next to the base projection it rides on (GPU; the CPU runs the interpreter).

For a fused q/k/v projection (Llama-3.1-8B shapes by default: hidden 4096, q 4096, k/v 1024, bf16)
and a batch of ``num_tokens`` tokens spread round-robin over 4 adapters (rank 16), times:

- ``base``: the dense projection ``x @ W.T`` (cuBLAS);
- ``triton``: one LoRA shrink (q, k, v stacked) + three expands into the fused output (our kernels);
- ``torch``: the same delta with the PyTorch reference (per-adapter gather, matmul, scatter).

Each delta is checked against the reference before it is timed. Writes
``benchmarks/results/lora-kernels-<device>-<utc time>.json`` and a PNG (LoRA time as a fraction of
the base projection, per batch size).

    python benchmarks/lora_kernels.py            # CUDA
    TRITON_INTERPRET=1 python benchmarks/lora_kernels.py --quick   # CPU smoke run (tiny shapes)
"""

from __future__ import annotations

import argparse
import datetime as dt
import pathlib
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--kv", type=int, default=1024, help="k and v widths")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-loras", type=int, default=4)
    p.add_argument("--tokens", default="1,4,16,64,256,1024")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--quick", action="store_true", help="hidden 128, kv 32, tokens 1,16 (CPU interpreter)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.kv, args.tokens = 128, 32, "1,16"
    return args


def bench(fn, cuda: bool, reps: int = 20) -> float:
    """Median milliseconds of ``fn()``."""
    import torch

    fn()
    times = []
    for _ in range(reps if cuda else 2):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def plot(result: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(7, 4))
    tokens = [row["num_tokens"] for row in rows]
    ax.plot(tokens, [row["triton_over_base"] for row in rows], "o-", label="triton shrink+expand")
    ax.plot(tokens, [row["torch_over_base"] for row in rows], "s--", label="torch reference")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens in the batch (4 adapters)")
    ax.set_ylabel("LoRA time / base qkv projection time")
    s = result["settings"]
    ax.set_title(f"fused qkv LoRA (rank {s['rank']}) vs base projection, {result['device']}, {s['dtype']}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from pageant.engine.bench.scripts import save_result
    from pageant.kernels import lora as tri
    from pageant.kernels import lora_reference as ref
    from pageant.kernels.lora_reference import LoRAKernelMeta

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = getattr(torch, args.dtype)
    h, kv, r, L = args.hidden, args.kv, args.rank, args.max_loras
    widths = [h, kv, kv]
    g = torch.Generator(device=device).manual_seed(0)
    w = torch.randn(sum(widths), h, device=device, dtype=dtype, generator=g) / h**0.5
    lora_a = torch.randn(L, 3 * r, h, device=device, dtype=dtype, generator=g) / h**0.5  # q, k, v stacked
    lora_b = [torch.randn(L, n, r, device=device, dtype=dtype, generator=g) * 0.05 for n in widths]
    rows = []
    for num_tokens in [int(t) for t in args.tokens.split(",")]:
        x = torch.randn(num_tokens, h, device=device, dtype=dtype, generator=g)
        idx = (torch.arange(num_tokens) % L).to(torch.int32)
        meta = LoRAKernelMeta.build(idx, L)
        idx_d = idx.to(device)
        meta_d = LoRAKernelMeta(meta.sorted_token_indices.to(device), meta.num_tokens_per_slot.to(device),
                                meta.slot_start.to(device), L, meta.segments)
        base_out = x @ w.T

        def delta(ops):
            out = base_out.clone()
            y = ops.lora_shrink(x, lora_a, idx_d, 1.0, meta=meta_d)
            offset = 0
            for i, b in enumerate(lora_b):
                ops.lora_expand(y[:, i * r : (i + 1) * r], b, idx_d, out, True, offset=offset, meta=meta_d)
                offset += b.shape[1]
            return out

        torch.testing.assert_close(delta(tri).float(), delta(ref).float(), atol=5e-2, rtol=5e-2)
        clone_ms = bench(lambda: base_out.clone(), cuda)
        row = {
            "num_tokens": num_tokens,
            "base_ms": bench(lambda: x @ w.T, cuda),
            "triton_ms": bench(lambda: delta(tri), cuda) - clone_ms,
            "torch_ms": bench(lambda: delta(ref), cuda) - clone_ms,
        }
        row["triton_over_base"] = row["triton_ms"] / row["base_ms"]
        row["torch_over_base"] = row["torch_ms"] / row["base_ms"]
        rows.append(row)
        print(f"{num_tokens:>6} tokens: base {row['base_ms']:.4f} ms, triton LoRA {row['triton_ms']:.4f} ms "
              f"({row['triton_over_base']:.2f}x base), torch LoRA {row['torch_ms']:.4f} ms")
    name = torch.cuda.get_device_name() if cuda else "cpu (triton interpreter)"
    result = {"benchmark": "lora-kernels", "device": name, "torch": torch.__version__,
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}
    path = save_result(result, args.out, "lora-kernels", device.type, lambda png: plot(result, png))
    print(f"wrote {path} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
