"""The inference engine: paged KV cache, continuous batching, OpenAI-compatible server."""
