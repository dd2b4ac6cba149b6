"""The OpenAI-compatible HTTP server (`pageant serve`): FastAPI app, engine thread, metrics."""
