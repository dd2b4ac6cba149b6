"""Talk to `pageant serve` with the official OpenAI Python client.

    pageant serve                      # the bundled demo model on http://localhost:8000/v1
    python examples/openai_client.py   # in another terminal

Options: --base-url (default http://localhost:8000/v1), --api-key (or env PAGEANT_API_KEY; any
string when the server has no key), --model (default: the first model the server lists).
"""

from __future__ import annotations

import argparse
import os

from openai import OpenAI


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url", default="http://localhost:8000/v1")
    ap.add_argument("--api-key", default=os.environ.get("PAGEANT_API_KEY", "none"))
    ap.add_argument("--model", default=None)
    args = ap.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    models = [m.id for m in client.models.list().data]
    model = args.model or models[0]
    print(f"models: {', '.join(models)} (using {model})\n")

    # A chat completion (the model's chat template formats the messages).
    chat = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me about the assert statement."}],
        max_tokens=64,
        temperature=0.7,
        seed=0,
    )
    print("chat:", chat.choices[0].message.content)
    print(f"  finish_reason={chat.choices[0].finish_reason} usage={chat.usage.model_dump()}\n")

    # A streamed completion: text arrives token by token as server-sent events.
    print("stream: ", end="", flush=True)
    stream = client.completions.create(
        model=model, prompt="The for statement is", max_tokens=48, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        for choice in chunk.choices:
            print(choice.text, end="", flush=True)
        if chunk.usage is not None:
            print(f"\n  usage={chunk.usage.model_dump()}")


if __name__ == "__main__":
    main()
