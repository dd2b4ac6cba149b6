"""Vision-language models: images in requests (offline ``multi_modal_data`` and OpenAI ``image_url``
parts), the checkpoint's Hugging Face processor, the encoder cache and the merge of image features
at the placeholder tokens. One job per module:

- ``media``: decode image bytes / ``data:`` URIs / allowed http(s) URLs, with size and pixel limits;
- ``inputs``: ``MultiModalInputs`` (expanded prompt ids + one ``MultiModalItem`` per image, with
  its content hash and placeholder range) and the per-block prefix-cache key;
- ``processor``: wraps ``AutoProcessor``: prompt text + images -> ``MultiModalInputs``;
- ``encoder_cache``: the step's ``MultiModalBatch`` (which features go to which flat tokens), the
  encoder cache (hash -> features) and the merge into the input embeddings;
- ``chat``: OpenAI chat messages with image parts -> text with placeholders + decoded images.
"""

from pageant.engine.multimodal.inputs import MultiModalInputs, MultiModalItem, image_hash

__all__ = ["MultiModalInputs", "MultiModalItem", "image_hash"]
