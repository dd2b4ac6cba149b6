"""Vision-language serving on the CPU: images/s and time to first token for a batch of image chats,
with the encoder cache on vs off.

A LLaVA-shaped checkpoint (CLIP vision tower ``--vision-hidden`` x ``--vision-layers`` on
``--image-size`` images in 14x14 patches, Llama ``--hidden`` x ``--layers``), ``--num-prompts``
chats with one distinct image each, greedy, ``ignore_eos``. ``--max-num-batched-tokens`` is small,
so every prompt is prefilled in chunks that cut through its image tokens. With the encoder cache
on, each image is encoded once (its features serve the later chunks); off, every chunk that
touches an image re-encodes it. The two engines are interleaved in every round, best of
``--repeats``. Throughput is images per CPU-second of this process (1 torch thread by default);
TTFT is wall-clock (arrival to first token, mean over the batch, at the best round).

Writes ``benchmarks/results/vision-<device>-<utc time>.json`` and a PNG chart beside it.

    python benchmarks/vision.py            # CPU, about a minute on 2 cores
    python benchmarks/vision.py --quick    # seconds (the smoke test's settings)
"""

from __future__ import annotations

import pathlib
import statistics
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROMPT = "<|user|>\nDescribe <image> in one sentence.</s>\n<|assistant|>\n"


def parse_args(argv=None):
    from pageant.engine.bench.scripts import base_parser

    p = base_parser(__doc__, hidden=256, layers=4, out_default=ROOT / "benchmarks" / "results")
    p.add_argument("--vision-hidden", type=int, default=256)
    p.add_argument("--vision-layers", type=int, default=6)
    p.add_argument("--image-size", type=int, default=112, help="(image_size / 14)^2 image tokens per image")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--output-len", type=int, default=8)
    p.add_argument("--max-num-batched-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny model, 4 prompts, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.hidden, args.layers, args.vision_hidden, args.vision_layers = 64, 2, 32, 2
        args.image_size, args.num_prompts, args.repeats = 56, 4, 1
    return args


def build(path: pathlib.Path, args) -> str:
    """The LLaVA checkpoint at the benchmark's sizes (random weights, the test tokenizer)."""
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers import LlavaProcessor

    from pageant.engine.multimodal.testing import LLAVA_CHAT_TEMPLATE, _text_config, _tokenizer

    tok = _tokenizer(path, ["<image>"], LLAVA_CHAT_TEMPLATE)
    heads = max(4, args.hidden // 64)
    text = LlamaConfig(**{**_text_config(len(tok)), "hidden_size": args.hidden, "intermediate_size": 3 * args.hidden,
                          "num_hidden_layers": args.layers, "num_attention_heads": heads,
                          "num_key_value_heads": heads // 2})
    vision = CLIPVisionConfig(hidden_size=args.vision_hidden, intermediate_size=4 * args.vision_hidden,
                              num_hidden_layers=args.vision_layers, num_attention_heads=max(4, args.vision_hidden // 64),
                              image_size=args.image_size, patch_size=14)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"))
    LlavaForConditionalGeneration(config).to(torch.float32).save_pretrained(str(path))
    image_processor = CLIPImageProcessor(size={"shortest_edge": args.image_size},
                                         crop_size={"height": args.image_size, "width": args.image_size})
    LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14, num_additional_image_tokens=1,
                   vision_feature_select_strategy="default").save_pretrained(str(path))
    return str(path)


def plot(result: dict, path: pathlib.Path) -> None:
    from pageant.engine.bench.scripts import annotated_bars, figure, throughput_label

    names = list(result["runs"])
    with figure(path, 1, 2, figsize=(8, 3.6)) as (fig, axes):
        for ax, key, label in ((axes[0], "images_per_s", throughput_label(result["timing"], "images")),
                               (axes[1], "mean_ttft_s", "mean TTFT (s, wall)")):
            values = [result["runs"][n][key] for n in names]
            annotated_bars(ax, names, values, [f"{v:.3g}" for v in values], ["#3a7", "#777"])
            ax.set_ylabel(label)
            ax.set_ylim(0, max(values) * 1.25)
        s = result["settings"]
        fig.suptitle(f"LLaVA-shaped, {s['num_prompts']} image chats, {result['image_tokens']} image tokens each, "
                     f"{s['max_num_batched_tokens']}-token steps ({result['device']})", fontsize=9)


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    from PIL import Image

    from pageant.engine import LLM, SamplingParams
    from pageant.engine.bench.scripts import interleaved_rounds, result_header, save_result, setup_device, warm_up

    setup_device(args.device, args.threads)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (args.image_size + 9 * i % 40, args.image_size, 3),
                                           dtype=np.uint8)) for i in range(args.num_prompts)]
    prompts = [{"prompt": PROMPT, "multi_modal_data": {"image": im}} for im in images]
    sp = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = build(pathlib.Path(tmp), args)
        engines, ttft, encoded = {}, {}, {}
        for name, enabled in (("encoder_cache_on", True), ("encoder_cache_off", False)):
            llm = LLM(model=path, device=args.device, max_num_seqs=args.num_prompts,
                      max_num_batched_tokens=args.max_num_batched_tokens)
            llm.engine.runner.encoder_cache.enabled = enabled
            warm_up(llm, prompts, num_prompts=1, max_tokens=1)
            engines[name], ttft[name], encoded[name] = llm, [], []

        def run(name: str) -> int:
            llm, cache = engines[name], engines[name].engine.runner.encoder_cache
            cache.clear()  # every round starts cold: same work each round
            before = cache.num_encoded_images
            t0 = time.time()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            ttft[name].append(statistics.mean(o.metrics.first_token_time - t0 for o in outs))
            encoded[name].append(cache.num_encoded_images - before)
            return len(outs)

        runs = interleaved_rounds({n: (lambda n=n: run(n)) for n in engines}, args.repeats, args.device)
        image_tokens = engines["encoder_cache_on"].engine.mm_processor.process(PROMPT, images[:1]).items[0].length
        engines.clear()
    for name, r in runs.items():
        times = r["wall_seconds"] if args.device.startswith("cuda") else r["cpu_seconds"]
        best = int(np.argmin(times))
        r["images_per_s"] = r.pop("tokens_per_s")
        r["wall_images_per_s"] = r.pop("wall_tokens_per_s")
        r.update(mean_ttft_s=ttft[name][best], images_encoded_per_round=encoded[name][best])
        print(f"{name:>18}: {r['images_per_s']:7.2f} images/s, mean TTFT {r['mean_ttft_s']:.3f} s, "
              f"{r['images_encoded_per_round']} encoder passes over {args.num_prompts} images")
    result = result_header("vision", args)
    result.update(runs=runs, image_tokens=image_tokens,
                  speedup=runs["encoder_cache_on"]["images_per_s"] / runs["encoder_cache_off"]["images_per_s"])
    out = save_result(result, args.out, "vision", args.device, lambda png: plot(result, png))
    print(f"encoder cache on / off: {result['speedup']:.2f}x images/s; wrote {out} and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
