"""Short, self-contained scripts that use the official openai SDK against a fusedserve (or any OpenAI-compatible)
server: chat.py (one chat completion), streaming.py (a streamed chat reply with usage), completions.py (the legacy
completions endpoint). Run them as files or modules; the integration tests run each one against a real server.
"""
