"""Benchmark the Triton paged-attention kernels on a GPU (CUDA only; on a CPU it exits with a message).

Decode: time per call vs bytes moved over a batch x context grid with Llama-3.1-8B attention shapes
(32 query heads, 8 kv heads, head_dim 128, bf16, block_size 16). The floor is the bytes a decode step
must move (every cached K/V byte of the batch read once, queries read, outputs written); achieved
bandwidth is reported as a fraction of the device-to-device copy bandwidth measured first. The same
data gathered contiguously goes through ``torch.nn.functional.scaled_dot_product_attention`` for
comparison, and each Triton result is checked against it before it is timed.

Prefill (``--prefill``): causal prompts of several lengths, TFLOP/s against SDPA's causal kernel.

Writes ``benchmarks/results/kernels-<device>-<utc time>.json`` (device, torch/triton versions, date,
every measurement) and a PNG plot beside it.

    python benchmarks/kernels.py                 # the full decode grid
    python benchmarks/kernels.py --quick         # a few points
    python benchmarks/kernels.py --tune          # also sweep launch settings on a few points
    python benchmarks/kernels.py --prefill       # also the prefill table
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import pathlib
import sys
import types

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _import_kernels():
    """``pageant.kernels`` from an install, or straight from this checkout (the GPU box has no install)."""
    try:
        import pageant.kernels  # noqa: F401
    except ImportError:
        pkg = types.ModuleType("pageant")
        pkg.__path__ = [str(ROOT / "pageant"), str(ROOT)]  # pageant.kernels -> <repo>/kernels
        sys.modules["pageant"] = pkg
    from pageant.kernels import attention_decode, attention_prefill

    return attention_decode, attention_prefill


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,4,16,64,256", help="comma-separated batch sizes")
    p.add_argument("--contexts", default="128,512,2048,8192", help="comma-separated context lengths")
    p.add_argument("--num-heads", type=int, default=32)
    p.add_argument("--num-kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--quick", action="store_true", help="batches 1,64 x contexts 512,8192")
    p.add_argument("--tune", action="store_true", help="sweep block_n / warps / stages / splits on a few points")
    p.add_argument("--prefill", action="store_true", help="also benchmark prefill attention")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the JSON and PNG")
    return p.parse_args(argv)


def copy_bandwidth(torch, triton) -> float:
    """Bytes/s of a large device-to-device copy, counting bytes read plus bytes written."""
    src = torch.randn(1 << 28, device=device, dtype=torch.float16)  # 512 MiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def make_decode_inputs(torch, batch, context, args, dtype, gen, device):
    """A paged cache holding ``context`` tokens per sequence in shuffled blocks, plus the same K/V contiguous."""
    bs = args.block_size
    blocks_per_seq = math.ceil(context / bs)
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, bs, args.num_kv_heads, args.head_dim)
    k_cache = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    v_cache = torch.randn(shape, device=device, dtype=dtype, generator=gen)
    perm = torch.randperm(num_blocks, device=device, generator=gen).to(torch.int32)
    block_tables = perm.view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    query = torch.randn(batch, args.num_heads, args.head_dim, device=device, dtype=dtype, generator=gen)

    def contiguous(cache):  # [batch, kv_heads, context, head_dim]
        return cache[block_tables.long()].flatten(1, 2)[:, :context].transpose(1, 2).contiguous()

    return query, k_cache, v_cache, block_tables, seq_lens, contiguous(k_cache), contiguous(v_cache)


def decode_bytes(batch, context, args, elem) -> int:
    kv = 2 * batch * context * args.num_kv_heads * args.head_dim * elem
    return kv + 2 * batch * args.num_heads * args.head_dim * elem  # + queries in, outputs out


def rel_error(out, ref) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def bench_decode(torch, timer, F, attention_decode, args, dtype, copy_bw, points, tqdm, device, num_sms):
    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    elem = torch.empty((), dtype=dtype).element_size()
    scale = 1.0 / math.sqrt(args.head_dim)
    for batch, context in tqdm(points, desc="decode"):
        q, kc, vc, bt, sl, k, v = make_decode_inputs(torch, batch, context, args, dtype, gen, device)
        sdpa = lambda: F.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=scale, enable_gqa=True)  # noqa: E731
        tri = lambda: attention_decode.decode_attention(q, kc, vc, bt, sl, scale)  # noqa: E731
        ref = sdpa().squeeze(2)
        err = rel_error(tri(), ref)
        t_tri, t_sdpa = timer(tri), timer(sdpa)
        nbytes = decode_bytes(batch, context, args, elem)
        splits = attention_decode.choose_num_splits(batch, args.num_kv_heads, bt.shape[1] * args.block_size, 64, num_sms)
        rows.append({
            "batch": batch, "context": context, "num_splits": splits, "bytes": nbytes, "rel_error_vs_sdpa": err,
            "triton_us": t_tri * 1e3, "sdpa_us": t_sdpa * 1e3,
            "triton_bw_frac": nbytes / (t_tri * 1e-3) / copy_bw, "sdpa_bw_frac": nbytes / (t_sdpa * 1e-3) / copy_bw,
        })
        if err > 2e-2:
            print(f"WARNING: batch {batch} context {context}: triton vs sdpa relative error {err:.2e}")
        del q, kc, vc, bt, sl, k, v, ref
        torch.cuda.empty_cache()
    return rows


TUNE_POINTS = [(1, 8192), (16, 2048), (64, 8192), (256, 512)]
TUNE_CONFIGS = [(bn, w, s) for bn in (32, 64, 128) for w in (2, 4, 8) for s in (1, 2, 3)]  # block_n, warps, stages


def tune_decode(torch, timer, attention_decode, args, dtype, copy_bw, tqdm, device, num_sms, points, configs):
    """Launch settings per point (a lead for retuning the defaults; the default row is marked)."""
    gen = torch.Generator(device=device).manual_seed(1)
    elem = torch.empty((), dtype=dtype).element_size()
    rows = []
    default_bn = 64 if args.head_dim <= 128 and dtype != torch.float32 else 32  # decode_attention's choice
    for batch, context in tqdm(points, desc="tune"):
        q, kc, vc, bt, sl, _, _ = make_decode_inputs(torch, batch, context, args, dtype, gen, device)
        ref = attention_decode.decode_attention(q, kc, vc, bt, sl, 0.1)
        nbytes = decode_bytes(batch, context, args, elem)
        for bn, w, s in configs:
            base = attention_decode.choose_num_splits(batch, args.num_kv_heads, context, bn, num_sms)
            for splits in sorted({1, base, min(2 * base, attention_decode.MAX_SPLITS)}):
                fn = lambda: attention_decode.decode_attention(  # noqa: E731
                    q, kc, vc, bt, sl, 0.1, num_splits=splits, block_n=bn, num_warps=w, num_stages=s
                )
                try:
                    err = rel_error(fn(), ref)
                    ms = timer(fn)
                except Exception as e:  # a config the compiler rejects (e.g. out of shared memory)
                    rows.append({"batch": batch, "context": context, "block_n": bn, "num_warps": w,
                                 "num_stages": s, "num_splits": splits, "error": str(e)[:200]})
                    continue
                rows.append({"batch": batch, "context": context, "block_n": bn, "num_warps": w, "num_stages": s,
                             "num_splits": splits, "us": ms * 1e3, "bw_frac": nbytes / (ms * 1e-3) / copy_bw,
                             "rel_error": err, "default": (bn, w, s, splits) == (default_bn, 4, 2, base)})
        del q, kc, vc, bt, sl
        torch.cuda.empty_cache()
    return rows


PREFILL_POINTS = [(1, 512), (1, 2048), (1, 8192), (4, 2048), (16, 1024)]
# block_m, block_n, warps, stages; None = the wrapper's defaults
PREFILL_CONFIGS = [None] + [(m, n, w, s) for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)]


def bench_prefill(torch, timer, F, attention_prefill, args, dtype, tqdm, device, points, configs=(None,)):
    """Causal prompts with no cached prefix: TFLOP/s (causal: half the full matrix products).

    One row per (point, launch config); ``config`` None is the wrapper's default choice.
    """
    rows = []
    gen = torch.Generator(device=device).manual_seed(2)
    scale = 1.0 / math.sqrt(args.head_dim)
    for batch, length in tqdm(points, desc="prefill"):
        q_dec, kc, vc, bt, _, k, v = make_decode_inputs(torch, batch, length, args, dtype, gen, device)
        del q_dec
        query = torch.randn(batch * length, args.num_heads, args.head_dim, device=device, dtype=dtype, generator=gen)
        qsl = torch.arange(0, batch + 1, device=device, dtype=torch.int32) * length
        sl = torch.full((batch,), length, device=device, dtype=torch.int32)
        q4 = query.view(batch, length, args.num_heads, args.head_dim).transpose(1, 2)  # [b, h, t, d]
        sdpa = lambda: F.scaled_dot_product_attention(q4, k, v, is_causal=True, scale=scale, enable_gqa=True)  # noqa: E731
        ref = sdpa().transpose(1, 2).reshape(batch * length, args.num_heads, args.head_dim)
        flops = 4 * batch * args.num_heads * args.head_dim * length * length / 2
        t_sdpa = timer(sdpa)
        for config in configs:
            knobs = {} if config is None else dict(zip(("block_m", "block_n", "num_warps", "num_stages"), config))
            tri = lambda: attention_prefill.prefill_attention(query, kc, vc, bt, qsl, sl, scale, **knobs)  # noqa: E731
            row = {"batch": batch, "length": length, "config": config, "sdpa_us": t_sdpa * 1e3,
                   "sdpa_tflops": flops / (t_sdpa * 1e-3) / 1e12}
            try:
                row["rel_error_vs_sdpa"] = rel_error(tri(), ref)
                t_tri = timer(tri)
            except Exception as e:  # a config the compiler rejects (e.g. out of shared memory)
                rows.append(row | {"error": str(e)[:200]})
                continue
            rows.append(row | {"triton_us": t_tri * 1e3, "triton_tflops": flops / (t_tri * 1e-3) / 1e12})
        del query, kc, vc, bt, k, v, ref
        torch.cuda.empty_cache()
    return rows


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for batch in sorted({r["batch"] for r in rows}):
        pts = sorted((r["context"], r["triton_bw_frac"], r["sdpa_bw_frac"]) for r in rows if r["batch"] == batch)
        line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"triton, batch {batch}")[0]
        ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="x", linestyle="--", color=line.get_color(),
                label=f"sdpa (contiguous), batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("achieved bandwidth / copy bandwidth")
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_summary(result: dict) -> None:
    """The short table printed last (the full numbers are in the JSON)."""
    print(f"\n{'batch':>5} {'ctx':>5} {'splits':>6} {'triton us':>10} {'bw frac':>7} {'sdpa us':>9} {'bw frac':>7} {'err':>8}")
    for r in result["decode"]:
        print(f"{r['batch']:>5} {r['context']:>5} {r['num_splits']:>6} {r['triton_us']:>10.1f} {r['triton_bw_frac']:>7.2f}"
              f" {r['sdpa_us']:>9.1f} {r['sdpa_bw_frac']:>7.2f} {r['rel_error_vs_sdpa']:>8.1e}")
    if result.get("tune"):
        print("\nbest launch settings per point (block_n, warps, stages, splits):")
        for batch, context in sorted({(r["batch"], r["context"]) for r in result["tune"]}):
            ok = [r for r in result["tune"] if (r["batch"], r["context"]) == (batch, context) and "us" in r]
            best = min(ok, key=lambda r: r["us"], default=None)
            default = next((r for r in ok if r["default"]), None)
            if best is None:
                print(f"  batch {batch} ctx {context}: every setting failed")
                continue
            print(f"  batch {batch} ctx {context}: best {best['block_n']},{best['num_warps']},{best['num_stages']},"
                  f"{best['num_splits']} {best['us']:.1f} us ({best['bw_frac']:.2f})"
                  + (f"; default {default['us']:.1f} us ({default['bw_frac']:.2f})" if default else ""))
    for batch, length in sorted({(r["batch"], r["length"]) for r in result.get("prefill", [])}):
        ok = [r for r in result["prefill"] if (r["batch"], r["length"]) == (batch, length) and "triton_us" in r]
        default = next((r for r in ok if r["config"] is None), None)
        best = max(ok, key=lambda r: r["triton_tflops"], default=None)
        if default is None or best is None:
            print(f"prefill batch {batch} len {length}: failed")
            continue
        print(f"prefill batch {batch} len {length}: triton {default['triton_tflops']:.0f} TFLOP/s"
              f" (best {best['triton_tflops']:.0f} with {best['config'] or 'defaults'}),"
              f" sdpa {default['sdpa_tflops']:.0f} TFLOP/s, err {default['rel_error_vs_sdpa']:.1e}")


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); "
              "the kernels' correctness tests run on the CPU: pytest tests/kernels", file=sys.stderr)
        return 2
    import torch.nn.functional as F
    import triton
    import triton.testing
    from tqdm import tqdm

    attention_decode, attention_prefill = _import_kernels()
    dtype = getattr(torch, args.dtype)
    batches = [1, 64] if args.quick else [int(b) for b in args.batches.split(",")]
    contexts = [512, 8192] if args.quick else [int(c) for c in args.contexts.split(",")]
    device = torch.cuda.get_device_name(0)
    copy_bw = copy_bandwidth(torch, triton)
    num_sms = torch.cuda.get_device_properties(0).multi_processor_count
    timer = lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")  # noqa: E731  ms
    print(f"{device}: device-to-device copy {copy_bw / 1e12:.2f} TB/s (read + write)")

    result = {
        "device": device, "torch": torch.__version__, "triton": triton.__version__,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "shapes": {k: getattr(args, k) for k in ("num_heads", "num_kv_heads", "head_dim", "block_size", "dtype")},
        "copy_bandwidth_bytes_per_s": copy_bw,
        "decode": bench_decode(torch, timer, F, attention_decode, args, dtype, copy_bw,
                               [(b, c) for b in batches for c in contexts], tqdm, "cuda", num_sms),
    }
    if args.tune:
        result["tune"] = tune_decode(torch, timer, attention_decode, args, dtype, copy_bw, tqdm, "cuda", num_sms,
                                     TUNE_POINTS, TUNE_CONFIGS)
    if args.prefill:
        result["prefill"] = bench_prefill(torch, timer, F, attention_prefill, args, dtype, tqdm, "cuda", PREFILL_POINTS,
                                          PREFILL_CONFIGS if args.tune else (None,))

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"kernels-{device.replace(' ', '_')}-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    plot(result["decode"], out / f"{stem}.png", f"paged decode attention, {device}, {args.dtype}")

    print_summary(result)
    print(f"\nwrote {out / stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
