"""OpenAI chat messages with ``image_url`` parts -> the engine prompt of a vision-language model.

Runs on the server's tokenizer threads, before anything reaches the engine: the images are fetched
or decoded (``media``), each image part becomes the model's placeholder text in the message, the
chat template renders the conversation, and the checkpoint's processor expands the placeholders
and preprocesses the images (``processor``). Every problem is a ``MediaError`` / ``ValueError``
the handler turns into a 400.
"""

from __future__ import annotations

from pageant.engine.multimodal.inputs import MultiModalInputs
from pageant.engine.multimodal.media import MediaError, MediaLimits, load_image_url


def image_urls(messages) -> list[str]:
    """The ``image_url`` URLs of a conversation, in order."""
    return [part.image_url.url for m in messages if isinstance(m.content, list)
            for part in m.content if getattr(part, "type", None) == "image_url"]


def with_placeholders(messages, placeholder: str, text_part: type):
    """A copy of ``messages`` whose image parts are text parts holding ``placeholder``."""
    out = []
    for m in messages:
        if isinstance(m.content, list) and any(getattr(p, "type", None) == "image_url" for p in m.content):
            parts = [text_part(type="text", text=placeholder) if p.type == "image_url" else p for p in m.content]
            m = m.model_copy(update={"content": parts})
        out.append(m)
    return out


def chat_prompt(tokenizer, processor, messages, add_generation_prompt: bool, tools, limits: MediaLimits,
                text_part: type) -> tuple[dict, list[int]]:
    """``({"prompt_token_ids", "multi_modal_inputs"}, ids)`` for a conversation with images."""
    if processor is None:
        raise MediaError("this model is text-only: it does not accept image_url content parts")
    urls = image_urls(messages)
    if len(urls) > processor.limit_per_prompt:
        raise MediaError(f"at most {processor.limit_per_prompt} image(s) per request are allowed "
                         f"(--limit-mm-per-prompt), got {len(urls)}")
    images = [load_image_url(url, limits) for url in urls]
    text = tokenizer.render_chat(with_placeholders(messages, processor.placeholder, text_part),
                                 add_generation_prompt, tools)
    bos = getattr(tokenizer, "bos_token", None)
    mm: MultiModalInputs = processor.process(text, images, add_special_tokens=not (bos and text.startswith(bos)))
    return {"prompt_token_ids": mm.prompt_token_ids, "multi_modal_inputs": mm}, mm.prompt_token_ids
