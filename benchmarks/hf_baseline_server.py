"""The plain Hugging Face baseline: transformers `generate` behind a minimal OpenAI /v1/completions endpoint.

One request runs at a time (what a plain transformers deployment does without a batching engine); tokens stream
through TextIteratorStreamer. It implements just what benchmarks/serve_bench.py sends: prompt, max_tokens,
min_tokens/ignore_eos (as min_new_tokens), greedy decoding, streaming with a final usage chunk.
Benchmarks only: never imported by the package.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer


def build_app(model_dir: str, model_name: str) -> FastAPI:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lock = asyncio.Lock()
    app = FastAPI()

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({})

    @app.post("/v1/completions")
    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        ids = tokenizer(body["prompt"], return_tensors="pt").input_ids
        max_tokens = int(body.get("max_tokens", 16))
        min_tokens = max_tokens if body.get("ignore_eos") else int(body.get("min_tokens", 0))
        request_id = f"cmpl-{uuid.uuid4().hex}"

        async def events():
            async with lock:
                streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
                kwargs = dict(input_ids=ids, max_new_tokens=max_tokens, min_new_tokens=min_tokens,
                              do_sample=False, streamer=streamer)
                worker = threading.Thread(target=lambda: model.generate(**kwargs), daemon=True)
                worker.start()
                count = 0
                iterator = iter(streamer)
                while True:
                    text = await asyncio.to_thread(next, iterator, None)
                    if text is None:
                        break
                    count += 1
                    chunk = {"id": request_id, "object": "text_completion", "created": int(time.time()),
                             "model": model_name, "choices": [{"index": 0, "text": text, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                worker.join()
            usage = {"prompt_tokens": ids.shape[1], "completion_tokens": max_tokens,
                     "total_tokens": ids.shape[1] + max_tokens}
            yield f"data: {json.dumps({'id': request_id, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", default="hf-baseline")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    uvicorn.run(build_app(args.model, args.served_model_name), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
