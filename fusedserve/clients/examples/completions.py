"""The legacy completions endpoint with the openai SDK: continue a raw prompt (no chat template), print the text.

    python fusedserve/clients/examples/completions.py --base-url http://127.0.0.1:8000/v1 "The capital of France is"

--base-url defaults to $FUSEDSERVE_BASE_URL (else http://127.0.0.1:8000/v1), --model to $FUSEDSERVE_MODEL (else the
first model the server lists). Exits 0 on success and 1 when the completion is empty.
"""

from __future__ import annotations

import argparse
import os
import sys

import openai


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("prompt", nargs="?", default="The capital of France is")
    parser.add_argument("--base-url", default=os.environ.get("FUSEDSERVE_BASE_URL", "http://127.0.0.1:8000/v1"))
    parser.add_argument("--model", default=os.environ.get("FUSEDSERVE_MODEL"))
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    parser.add_argument("--max-tokens", type=int, default=32)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id
    response = client.completions.create(model=model, prompt=args.prompt, max_tokens=args.max_tokens, temperature=0)
    text = response.choices[0].text
    print(args.prompt + text)
    if response.usage is not None:
        usage = response.usage
        print(f"[{model}: {usage.prompt_tokens} tokens in, {usage.completion_tokens} out]")
    return 0 if text.strip() else 1


if __name__ == "__main__":
    sys.exit(main())
