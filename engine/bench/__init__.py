"""Benchmarks that users run themselves: ``pageant bench serve`` (online, against any
OpenAI-compatible server) and ``pageant bench throughput`` (offline, Pageant vs Hugging Face)."""
