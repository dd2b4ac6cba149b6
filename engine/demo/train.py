"""Train the demo checkpoint that `pageant serve` serves when no `--model` is given.

Reproducible: fixed seeds, deterministic algorithms, a fixed number of steps and a fixed thread
count, on text that ships with Python (the reference manual's topics in ``pydoc_data.topics`` and the
docstrings of the builtins), so the same Python, torch and tokenizers versions give the same
weights. About 10 minutes on one CPU core.

    python -m pageant.engine.demo.train [--out engine/demo/checkpoint] [--steps 600]

Output: a Hugging Face checkpoint (LlamaForCausalLM, float32 safetensors, < 20 MB) with a byte-level
BPE tokenizer (vocab 2048) and a chat template.
"""

from __future__ import annotations

import argparse
import builtins
import inspect
import json
import math
import pathlib
import random
import time

# The chat template: roles as special tokens, each turn ends with </s> (the eos token), so a chat
# reply stops by itself. No <s> in the template: the tokenizer's post-processor adds it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
VOCAB_SIZE = 2048
SEQ_LEN = 256
MODEL_CONFIG = dict(
    hidden_size=256,
    intermediate_size=640,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)
QUESTIONS = [
    "Tell me about {}.",
    "What is {} in Python?",
    "Explain {}.",
    "How does {} work?",
]


def corpus() -> list[tuple[str, str]]:
    """(title, text) documents, in a fixed order."""
    import pydoc_data.topics

    docs = [(name.replace("-", " "), text.strip()) for name, text in sorted(pydoc_data.topics.topics.items())]
    for name in sorted(dir(builtins)):
        if name.startswith("_"):
            continue
        doc = inspect.getdoc(getattr(builtins, name))
        if doc and len(doc) > 80:
            docs.append((name, doc.strip()))
    return docs


def train_tokenizer(texts: list[str], out: pathlib.Path):
    from transformers import PreTrainedTokenizerFast

    from pageant.engine.testing import train_byte_level_bpe

    tok = train_byte_level_bpe(texts, VOCAB_SIZE, SPECIAL_TOKENS)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[3:], model_max_length=MODEL_CONFIG["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out)
    # transformers 5 writes its own class name; the classic alias loads in transformers 4 and 5 alike.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return hf


def build_examples(docs: list[tuple[str, str]], tok, rng: random.Random) -> list[int]:
    """One token stream: each document as plain text and as a chat exchange, shuffled."""
    pieces: list[list[int]] = []
    eos = tok.eos_token_id
    for title, text in docs:
        pieces.append(tok.encode(text) + [eos])
        # A chat turn answering with the document's first paragraphs, so chat replies read like prose.
        answer = "\n\n".join(text.split("\n\n")[:4])
        question = rng.choice(QUESTIONS).format(title)
        prompt = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False)
        pieces.append(tok.encode(prompt + answer + "</s>\n"))
    rng.shuffle(pieces)
    return [t for p in pieces for t in p]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent / "checkpoint"))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="fixed for reproducibility")
    args = parser.parse_args(argv)

    import torch
    from tqdm import tqdm
    from transformers import LlamaConfig, LlamaForCausalLM

    random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    docs = corpus()
    tok = train_tokenizer([text for _, text in docs], out)
    rng = random.Random(args.seed)
    stream = torch.tensor(build_examples(docs, tok, rng), dtype=torch.long)
    print(f"{len(docs)} documents, {stream.numel()} tokens, vocab {len(tok)}")

    config = LlamaConfig(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, torch_dtype="float32", **MODEL_CONFIG,
    )
    model = LlamaForCausalLM(config)
    num_params = sum(p.numel() for p in model.parameters())
    print(f"LlamaForCausalLM with {num_params / 1e6:.2f}M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, args.steps - warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    start = time.time()
    bar = tqdm(range(args.steps), desc="training", mininterval=10)
    for step in bar:
        offsets = torch.randint(0, stream.numel() - SEQ_LEN - 1, (args.batch_size,), generator=gen)
        batch = torch.stack([stream[o : o + SEQ_LEN + 1] for o in offsets.tolist()])  # [batch, seq_len + 1]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss  # transformers shifts the labels itself
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    print(f"trained {args.steps} steps in {time.time() - start:.0f}s, last loss {loss.item():.3f}")

    model.eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    (out / "TRAINING.json").write_text(json.dumps({
        "script": "engine/demo/train.py", "steps": args.steps, "batch_size": args.batch_size,
        "seq_len": SEQ_LEN, "lr": args.lr, "seed": args.seed, "threads": args.threads,
        "num_params": num_params, "final_loss": round(loss.item(), 4), "num_tokens": stream.numel(),
        "torch": torch.__version__,
    }, indent=2) + "\n")
    sample = tok.apply_chat_template([{"role": "user", "content": "Tell me about assert."}], add_generation_prompt=True, tokenize=False)
    ids = tok(sample, return_tensors="pt").input_ids
    with torch.no_grad():
        gen_ids = model.generate(ids, max_new_tokens=40, do_sample=False)
    print("sample:", tok.decode(gen_ids[0, ids.shape[1]:], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
