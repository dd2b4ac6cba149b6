"""The checkpoint's Hugging Face processor (``AutoProcessor``): prompt text + images -> ``MultiModalInputs``.

Image sizes, resizing, tiling and the expansion of each image placeholder into the model's number of
image tokens are the processor's, so they match what the model was trained with. The model class
says how the processor's tensors split per image (``mm_split_items``) and, for M-RoPE models, the
3-D positions of the prompt (``mm_rope_positions``).
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from pageant.engine.multimodal.inputs import MultiModalInputs, MultiModalItem, image_hash

DEFAULT_LIMIT_PER_PROMPT = 16  # images per prompt unless --limit-mm-per-prompt says otherwise


def load_hf_processor(path: str | pathlib.Path):
    """``AutoProcessor.from_pretrained(path)``. Processors with a video part (Qwen2-VL) need
    torchvision for it; without torchvision the same processor class is built for images only."""
    import transformers

    error: Exception | None = None
    try:
        processor = transformers.AutoProcessor.from_pretrained(str(path))
        if hasattr(processor, "image_processor"):
            return processor
    except (ImportError, AttributeError, ValueError, TypeError) as exc:
        error = exc
    cfg_file = pathlib.Path(path) / "processor_config.json"
    name = json.loads(cfg_file.read_text()).get("processor_class") if cfg_file.is_file() else None
    cls = getattr(transformers, name, None) if name else None
    if cls is None:
        raise ValueError(f"cannot load the image processor of {path}: {error or 'no processor_config.json'}")

    class ImageOnly(cls):  # the video attribute dropped; images and text as the real class
        @classmethod
        def get_attributes(klass):
            return [a for a in cls.get_attributes() if "video" not in a]

    ImageOnly.__name__ = ImageOnly.__qualname__ = cls.__name__

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    image_processor = transformers.AutoImageProcessor.from_pretrained(str(path))
    template = getattr(tokenizer, "chat_template", None)
    return ImageOnly(image_processor=image_processor, tokenizer=tokenizer, chat_template=template)


class MultiModalProcessor:
    """Wraps the HF processor of a vision-language checkpoint for one model class."""

    def __init__(self, path: str | pathlib.Path, model_cls: type, hf_config: dict[str, Any],
                 limit_per_prompt: int = DEFAULT_LIMIT_PER_PROMPT):
        self.hf = load_hf_processor(path)
        self.model_cls = model_cls
        self.hf_config = hf_config
        self.limit_per_prompt = limit_per_prompt
        self.image_token = self.hf.image_token  # the single token the prompt text carries per image
        self.image_token_id = int(hf_config.get("image_token_index", hf_config.get("image_token_id")))
        self.placeholder = model_cls.mm_prompt_placeholder(self.image_token)  # what a chat image part becomes

    def process(self, prompt: str, images: list, add_special_tokens: bool = True) -> MultiModalInputs:
        """Expand ``prompt``'s image placeholders (one ``image_token`` per image, in order) and
        preprocess ``images`` (PIL, RGB). ValueError when the counts disagree or exceed the limit."""
        if not isinstance(prompt, str) or not prompt:
            raise ValueError("a prompt with images needs the prompt text ('prompt'), with one "
                             f"{self.image_token!r} per image")
        if len(images) > self.limit_per_prompt:
            raise ValueError(f"at most {self.limit_per_prompt} image(s) per prompt are allowed "
                             f"(--limit-mm-per-prompt), got {len(images)}")
        count = prompt.count(self.image_token)
        if count != len(images):
            raise ValueError(f"the prompt has {count} image placeholder(s) {self.image_token!r} but "
                             f"{len(images)} image(s) were given")
        out = self.hf(text=[prompt], images=images or None, return_tensors="pt",
                      add_special_tokens=add_special_tokens)
        ids = [int(t) for t in out["input_ids"][0]]
        datas, lengths = self.model_cls.mm_split_items(out, len(images), self.hf_config)
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(positions) != sum(lengths):
            raise ValueError(f"the processor made {len(positions)} image tokens for {sum(lengths)} image features")
        items, k = [], 0
        for image, data, length in zip(images, datas, lengths):
            offset = positions[k]
            if positions[k + length - 1] != offset + length - 1:
                raise ValueError("an image's placeholder tokens are not contiguous")
            items.append(MultiModalItem(hash=image_hash(image), offset=offset, length=length, data=data))
            k += length
        mm = MultiModalInputs(prompt_token_ids=ids, items=items)
        rope = getattr(self.model_cls, "mm_rope_positions", None)
        if rope is not None:
            mm.mrope_positions, mm.mrope_delta = rope(ids, items, self.hf_config)
        return mm


def make_processor(path: str | pathlib.Path, model_config, config) -> MultiModalProcessor | None:
    """The ``MultiModalProcessor`` of a vision-language checkpoint (``config``: the ``EngineConfig``),
    None for a text-only model."""
    from pageant.engine.models.registry import model_class

    cls = model_class(model_config.architecture)
    if not getattr(cls, "supports_multimodal", False):
        return None
    if config.world_size > 1:
        raise ValueError(f"{model_config.architecture} (vision-language) runs on one process: "
                         "tensor_parallel_size and pipeline_parallel_size must be 1")
    limit = (config.limit_mm_per_prompt or {}).get("image", DEFAULT_LIMIT_PER_PROMPT)
    return MultiModalProcessor(path, cls, model_config.raw, limit)


def prompt_inputs(processor: MultiModalProcessor | None, prompt: Any) -> MultiModalInputs | None:
    """The ``MultiModalInputs`` of an engine prompt: a dict with ``multi_modal_data`` ({"image":
    PIL image or list of them}, processed here) or ``multi_modal_inputs`` (already processed, by
    the server); None for a text-only prompt. ``InvalidRequestError`` for anything unusable."""
    from pageant.engine.exceptions import InvalidRequestError

    if not isinstance(prompt, dict) or ("multi_modal_data" not in prompt and "multi_modal_inputs" not in prompt):
        return None
    if processor is None:
        raise InvalidRequestError("this model is text-only: it does not accept images (multi_modal_data)")
    if prompt.get("multi_modal_inputs") is not None:
        mm = prompt["multi_modal_inputs"]
        if not isinstance(mm, MultiModalInputs):
            raise InvalidRequestError("multi_modal_inputs must be a MultiModalInputs")
        return mm
    data = prompt["multi_modal_data"]
    if not isinstance(data, dict) or set(data) - {"image"}:
        raise InvalidRequestError("multi_modal_data must be a dict with the key 'image' (a PIL image or a list)")
    images = data.get("image")
    images = [] if images is None else list(images) if isinstance(images, (list, tuple)) else [images]
    from PIL import Image

    if not all(isinstance(im, Image.Image) for im in images):
        raise InvalidRequestError("multi_modal_data['image'] must be a PIL.Image.Image or a list of them")
    if "prompt" not in prompt:
        raise InvalidRequestError("a prompt with multi_modal_data needs the prompt text ('prompt'), with one "
                                  f"{processor.image_token!r} per image")
    try:
        return processor.process(prompt["prompt"], [im.convert("RGB") for im in images])
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
