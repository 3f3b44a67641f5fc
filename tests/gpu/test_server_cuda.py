"""`fusedserve serve --device cuda` end to end with the official openai SDK.

NOT YET RUN ON A GPU (written 2026-11-21 without one). The whole integration suite (tests/integration) also
runs on CUDA on a GPU machine, because `--device auto` (the default) picks CUDA there.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def cuda_server(server_launcher):
    with server_launcher("--device", "cuda", "--max-model-len", "1024", "--max-num-seqs", "16") as server:
        yield server


def test_the_server_reports_it_runs_on_cuda(cuda_server):
    assert "device: cuda" in cuda_server.log()


def test_chat_completion_on_cuda(cuda_server):
    response = cuda_server.openai().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0
    )
    assert response.choices[0].message.content
    assert response.usage.completion_tokens <= 16


def test_streamed_chat_equals_the_unstreamed_greedy_text(cuda_server):
    client = cuda_server.openai()
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0,
                                            stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == whole.choices[0].message.content


def test_completions_with_n_seed_and_logprobs_on_cuda(cuda_server):
    client = cuda_server.openai(strict=False)
    response = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, n=2, temperature=0.8, seed=7, logprobs=2
    )
    assert len(response.choices) == 2
    assert all(len(choice.logprobs.tokens) == len(choice.logprobs.top_logprobs) for choice in response.choices)
    again = client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=8, n=2, temperature=0.8, seed=7, logprobs=2
    )
    assert [c.text for c in again.choices] == [c.text for c in response.choices]  # seeds draw on the host


def test_concurrent_requests_all_finish(cuda_server):
    import asyncio

    async def run() -> list[str]:
        client = cuda_server.async_openai()
        calls = [
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Count to {i}."}], max_tokens=24, temperature=0
            )
            for i in range(12)
        ]
        return [r.choices[0].finish_reason for r in await asyncio.gather(*calls)]

    assert all(reason in ("stop", "length") for reason in asyncio.run(run()))
