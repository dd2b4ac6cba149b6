"""Offline batch generation with Pageant's engine.

    python examples/offline.py                     # builds a tiny random checkpoint first
    python examples/offline.py --model /path/to/hf-checkpoint --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import tempfile

from pageant.engine import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder or Hugging Face hub id (default: a tiny random one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()

    model = args.model
    if model is None:
        from pageant.engine.testing import build_checkpoint

        model = str(build_checkpoint(tempfile.mkdtemp(prefix="pageant-tiny-"), arch="llama"))
        print(f"built a tiny random checkpoint in {model} (its output is gibberish)")

    llm = LLM(model=model, device=args.device, dtype=args.dtype)
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
    greedy = SamplingParams(temperature=0, max_tokens=args.max_tokens)
    for out in llm.generate(prompts, greedy):
        print(f"{out.prompt!r} -> {out.outputs[0].text!r} ({out.outputs[0].finish_reason})")

    sampled = SamplingParams(temperature=0.8, top_p=0.95, n=2, seed=0, max_tokens=args.max_tokens)
    for completion in llm.generate("Tell me a story:", sampled)[0].outputs:
        print(f"sample {completion.index}: {completion.text!r}")

    chat = llm.chat([{"role": "user", "content": "Hello!"}], SamplingParams(max_tokens=args.max_tokens, seed=1))
    print("chat:", repr(chat[0].outputs[0].text))
    print("stats:", llm.stats())


if __name__ == "__main__":
    main()
