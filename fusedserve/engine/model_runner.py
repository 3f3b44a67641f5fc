"""Runs one scheduled step: builds the flat batch, runs the model over the KV slots, samples next tokens.

It decides how a step runs, never what runs (admission and preemption are the scheduler's) and never maps KV
memory (the KV cache's). Logits are computed only for the rows that sample, so prefill chunks cost no LM head.
The batch is built on the model's device; the logits come back to the host, where the sampler works on any
device's model (its per-row edits and per-request seeded generators are host code), so a seed draws the same
tokens on a CPU and on a GPU. Copying [S, vocab] fp32 back is the step's one synchronisation with the device.
"""

from __future__ import annotations

import torch

from fusedserve.engine.kv_cache import KVCache
from fusedserve.engine.model.llama import LlamaModel
from fusedserve.engine.request import Request
from fusedserve.engine.sampler import Sampler, SampleResult
from fusedserve.engine.scheduler import SchedulerOutput
from fusedserve.kernels.attention import SlotBatch


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: KVCache, sampler: Sampler) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.sampler = sampler

    def run(self, scheduled: SchedulerOutput) -> tuple[list[Request], torch.Tensor]:
        """Compute the step's tokens; return the requests that sample and their float32 logits [S, vocab]."""
        input_ids: list[int] = []
        slots, query_lens, context_lens = [], [], []
        for chunk in scheduled.chunks:
            request = chunk.request
            start = request.num_computed_tokens
            input_ids.extend(request.all_token_ids[start : start + chunk.num_tokens])
            assert request.slot is not None
            slots.append(request.slot)
            query_lens.append(chunk.num_tokens)
            context_lens.append(start + chunk.num_tokens)
        device = self.model.device
        batch = SlotBatch.build(slots, query_lens, context_lens, device)
        hidden = self.model.forward(
            torch.tensor(input_ids, dtype=torch.long, device=device),
            batch,
            self.kv_cache.key_cache,
            self.kv_cache.value_cache,
        )
        sampling = [i for i, chunk in enumerate(scheduled.chunks) if chunk.samples]
        rows = [batch.token_starts[i] + query_lens[i] - 1 for i in sampling]
        rows_tensor = torch.tensor(rows, dtype=torch.long, device=device)
        logits = self.model.compute_logits(hidden.index_select(0, rows_tensor)) if sampling else hidden.new_empty(0)
        self.kv_cache.step_queued()
        return [scheduled.chunks[i].request for i in sampling], logits.to("cpu")

    def sample(self, requests: list[Request], logits: torch.Tensor) -> list[SampleResult]:
        return self.sampler.sample(logits, requests)
