"""The reasoning parsers (engine/server/reasoning.py): deepseek_r1 and qwen3 on recorded-style outputs;
streaming in random chunkings (1-char chunks included, tags split across chunks) == extract."""

from __future__ import annotations

import random
import time

import pytest

from pageant.engine.server.reasoning import (REASONING_PARSERS, DeepSeekR1ReasoningParser, Qwen3ReasoningParser,
                                             ReasoningParser, get_reasoning_parser)

R1 = DeepSeekR1ReasoningParser
Q3 = Qwen3ReasoningParser
Q3P = lambda: Qwen3ReasoningParser(think_in_prompt=True)  # noqa: E731

# (label, parser factory, output, expected reasoning, expected content)
EXAMPLES = [
    ("r1_template_opened", R1,
     "Okay, the user is asking what 2 + 2 is. That's basic arithmetic: 4.\n</think>\n\nThe answer is **4**.",
     "Okay, the user is asking what 2 + 2 is. That's basic arithmetic: 4.\n", "\n\nThe answer is **4**."),
    ("r1_explicit_open", R1, "<think>\n嗯，用户问的是 2+2。\n</think>\n\n答案是 4。", "\n嗯，用户问的是 2+2。\n", "\n\n答案是 4。"),
    ("r1_leading_ws_open", R1, "\n  <think>plan</think>done", "plan", "done"),
    ("r1_truncated", R1, "Let me work through this carefully. First, 17 * 23 = 391. Then", 
     "Let me work through this carefully. First, 17 * 23 = 391. Then", None),
    ("r1_truncated_partial_tag", R1, "<think>so the answer is 5</thi", "so the answer is 5</thi", None),
    ("r1_empty_reasoning", R1, "</think>\n\nHello!", None, "\n\nHello!"),
    ("r1_empty_think_block", R1, "<think>\n\n</think>\n\nHello!", None, "\n\nHello!"),
    ("r1_tags_only", R1, "<think></think>", None, None),
    ("r1_empty", R1, "", None, None),
    ("r1_blank_answer", R1, "thinking</think>\n\n", "thinking", None),
    ("r1_lookalike_tags", R1, "x </thinker> <think> y</think>z <think>w</think>", "x </thinker> <think> y",
     "z <think>w</think>"),
    ("r1_tool_call_after", R1, "Need the weather.</think>\n\n<tool_call>\n{\"name\": \"w\"}\n</tool_call>",
     "Need the weather.", "\n\n<tool_call>\n{\"name\": \"w\"}\n</tool_call>"),
    ("q3_thinking", Q3, "<think>\nThe user wants a haiku about autumn. 5-7-5.\n</think>\n\nCrisp leaves drift and fall",
     "\nThe user wants a haiku about autumn. 5-7-5.\n", "\n\nCrisp leaves drift and fall"),
    ("q3_no_think", Q3, "Hello! How can I help you today?", None, "Hello! How can I help you today?"),
    ("q3_think_not_at_start", Q3, "Sure: <think> is the tag Qwen3 uses.</think>", None,
     "Sure: <think> is the tag Qwen3 uses.</think>"),
    ("q3_close_without_open", Q3, "reasoning</think>answer", None, "reasoning</think>answer"),
    ("q3_unclosed", Q3, "<think>\nLet me count the r's in strawberry: s-t-r", "\nLet me count the r's in strawberry: s-t-r",
     None),
    ("q3_empty_think", Q3, "<think>\n\n</think>\n\nParis.", None, "\n\nParis."),
    ("q3_leading_ws", Q3, "\n<think>a</think>b", "a", "b"),
    ("q3_ws_only", Q3, " \n ", None, None),
    ("q3_partial_open_only", Q3, "<thi", None, "<thi"),
    ("q3p_template_opened", Q3P, "The user greets me.\n</think>\n\nHi there!", "The user greets me.\n", "\n\nHi there!"),
    ("q3p_explicit_open", Q3P, "<think>x</think>y", "x", "y"),
    ("q3p_truncated", Q3P, "still thinking", "still thinking", None),
]
IDS = [e[0] for e in EXAMPLES]


def chunkings(text: str):
    yield "whole", [text]
    yield "chars", list(text)
    for seed in range(5):
        rng = random.Random(seed)
        chunks, i = [], 0
        while i < len(text):
            k = rng.randint(1, 6)
            chunks.append(text[i:i + k])
            i += k
        yield f"seed{seed}", chunks


def run_stream(parser: ReasoningParser, chunks) -> tuple[str, str, list]:
    outs = [parser.stream(c) for c in chunks] + [parser.finish()]
    for r, c in outs:
        assert r != "" and c != "", "empty deltas are None"
    return "".join(r or "" for r, _ in outs), "".join(c or "" for _, c in outs), outs


@pytest.mark.parametrize("example", EXAMPLES, ids=IDS)
def test_extract(example):
    _, factory, text, reasoning, content = example
    assert factory().extract(text) == (reasoning, content)


@pytest.mark.parametrize("example", EXAMPLES, ids=IDS)
def test_stream_matches_extract(example):
    _, factory, text, reasoning, content = example
    for label, chunks in chunkings(text):
        r, c, _ = run_stream(factory(), chunks)
        assert (r or None, c or None) == (reasoning, content), label


def test_tags_split_across_chunks():
    p = R1()
    assert p.stream("<th") == (None, None)
    assert p.stream("ink>") == (None, None)
    assert p.stream("\nstep one") == ("\nstep one", None)
    assert p.stream(", done</th") == (", done", None)  # the possible tag prefix is held back
    assert not p.reasoning_ended
    assert p.stream("ink>\n\n") == (None, None)  # a blank answer so far is held
    assert p.reasoning_ended
    assert p.stream("Answer") == (None, "\n\nAnswer")
    assert p.finish() == (None, None)
    p = Q3()
    assert p.stream(" ") == (None, None) and p.stream("<") == (None, None) and p.stream("thi") == (None, None)
    assert p.stream("s is not a tag") == (None, " <this is not a tag")
    p = Q3()
    assert p.stream("<thi") == (None, None)
    assert p.finish() == (None, "<thi")
    p = R1()
    assert p.stream("a</") == ("a", None)
    assert p.stream("b") == ("</b", None)  # not the tag after all: released


def test_is_reasoning_end():
    r1, q3 = R1(), Q3()
    assert not r1.is_reasoning_end("") and not r1.is_reasoning_end("Hello") and not r1.is_reasoning_end("x</thi")
    assert r1.is_reasoning_end("x</think>") and r1.is_reasoning_end("<think>x</think>y")
    assert not q3.is_reasoning_end("") and not q3.is_reasoning_end(" \n") and not q3.is_reasoning_end("<thi")
    assert not q3.is_reasoning_end("<think>abc")
    assert q3.is_reasoning_end("<think>abc</think>") and q3.is_reasoning_end("Hello")  # no reasoning at all
    assert not Q3P().is_reasoning_end("Hello") and Q3P().is_reasoning_end("Hello</think>")
    # is_reasoning_end does not disturb a streaming instance
    assert r1.stream("abc</th") == ("abc", None)
    assert r1.is_reasoning_end("</think>") and not r1.reasoning_ended
    assert r1.finish() == ("</th", None)


def test_registry():
    assert REASONING_PARSERS == {"deepseek_r1": DeepSeekR1ReasoningParser, "qwen3": Qwen3ReasoningParser}
    for name, cls in REASONING_PARSERS.items():
        assert get_reasoning_parser(name) is cls and cls.name == name
    with pytest.raises(ValueError, match="deepseek_r1, qwen3"):
        get_reasoning_parser("granite")


def test_stream_after_finish():
    p = R1()
    assert p.stream("x<") == ("x", None)
    assert p.finish() == ("<", None)
    assert p.finish() == (None, None)
    with pytest.raises(RuntimeError):
        p.stream("y")


@pytest.mark.parametrize("factory", [R1, Q3, Q3P], ids=["deepseek_r1", "qwen3", "qwen3_think_in_prompt"])
def test_fuzz_streaming_agrees(factory):
    fragments = ["<think>", "</think>", "<", "</", "<th", "</thi", "think", ">", " ", "\n", "a", "é", "<t"]
    rng = random.Random(str(factory))
    for _ in range(400):
        text = "".join(rng.choice(fragments) for _ in range(rng.randint(0, 12)))
        reasoning, content = factory().extract(text)
        assert reasoning is None or reasoning.strip()
        assert content is None or content.strip()
        for label, chunks in chunkings(text):
            r, c, _ = run_stream(factory(), chunks)
            assert (r or None, c or None) == (reasoning, content), (text, label)


def test_long_reasoning_streams_in_linear_time():
    text = "<think>" + "hmm, " * 100000 + "</think>\n\n" + "ok " * 50000
    start = time.perf_counter()
    r, c, _ = run_stream(Q3(), [text[i:i + 4] for i in range(0, len(text), 4)])
    assert r == "hmm, " * 100000 and c == "\n\n" + "ok " * 50000
    assert time.perf_counter() - start < 10
