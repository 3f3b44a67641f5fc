"""fusedserve: an OpenAI-compatible LLM server over a continuous-batching engine."""

__version__ = "0.1.0"
