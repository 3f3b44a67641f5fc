"""A streamed chat reply with the openai SDK: print tokens as they arrive, then time to first token and usage.

    python fusedserve/clients/examples/streaming.py --base-url http://127.0.0.1:8000/v1 "Tell me about the sea."

--base-url defaults to $FUSEDSERVE_BASE_URL (else http://127.0.0.1:8000/v1), --model to $FUSEDSERVE_MODEL (else the
first model the server lists). `stream_options.include_usage` makes the server end with a usage-only chunk (no
choices). Exits 0 on success and 1 when no text streamed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import openai


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="Tell me about the sea.")
    parser.add_argument("--base-url", default=os.environ.get("FUSEDSERVE_BASE_URL", "http://127.0.0.1:8000/v1"))
    parser.add_argument("--model", default=os.environ.get("FUSEDSERVE_MODEL"))
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    parser.add_argument("--max-tokens", type=int, default=64)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    started = time.perf_counter()
    first_token_at: float | None = None
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.prompt}],
        max_tokens=args.max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                first_token_at = first_token_at or time.perf_counter()
                print(choice.delta.content, end="", flush=True)
    print()
    if first_token_at is None:
        return 1
    summary = f"time to first token {first_token_at - started:.3f} s, total {time.perf_counter() - started:.3f} s"
    if usage is not None:
        summary += f", {usage.prompt_tokens} tokens in, {usage.completion_tokens} out"
    print(f"[{model}: {summary}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
