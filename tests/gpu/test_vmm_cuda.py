"""vAttention on real CUDA VMM (cuda-python): pages map, move and unmap under load while kernels read the slots.

NOT YET RUN ON A GPU (written 2026-11-21 without one). Each step writes a known value into every live slot,
queues reads of [slot, :len] on the GPU behind a long matmul chain, marks the step (step_queued) and hands the
next lengths to the map-ahead thread, which maps, trims and releases pages concurrently. The host checks the
sums only every few steps, so slots are freed and their pages moved or released while reads of them may still
be queued: an unmap that did not wait for them would fault (illegal address) or corrupt the sums.
"""

from __future__ import annotations

import importlib.util
import random

import pytest
import torch

from fusedserve.engine.kv_cache import KVCacheSpec

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PAGE = 2 * 1024 * 1024


def has_cuda_python() -> bool:
    try:
        return any(importlib.util.find_spec(name) is not None for name in ("cuda.bindings", "cuda.cuda"))
    except ModuleNotFoundError:
        return False


needs_cuda_python = pytest.mark.skipif(not has_cuda_python(), reason="cuda-python is not installed (gpu extra)")


@needs_cuda_python
def test_the_backend_reports_the_stock_2mib_granularity():
    from fusedserve.engine.vattention.cuda_backend import CudaMemoryBackend

    backend = CudaMemoryBackend(torch.device("cuda", 0))
    try:
        assert backend.granularity == PAGE
    finally:
        backend.close()


@needs_cuda_python
@pytest.mark.parametrize("layout", ["all_layers", "per_layer"])
def test_pages_map_move_and_unmap_under_load_without_faults_or_lost_data(layout):
    from fusedserve.engine.vattention.kv_cache import VAttentionKVCache

    # bf16, 4 layers x 8 heads x 128: 16 KiB per token (all layers, K+V) -> 128 tokens per 2 MiB page group.
    spec = KVCacheSpec(num_layers=4, max_num_seqs=8, max_model_len=4096, num_kv_heads=8, head_dim=128,
                       dtype=torch.bfloat16)
    regions = 1 if layout == "all_layers" else 2 * spec.num_layers
    cache = VAttentionKVCache(spec, PAGE, 24 * PAGE * regions, "cuda", layout=layout, idle_release_steps=3)
    rng = random.Random(0)
    live: dict[int, tuple[int, float]] = {}  # slot -> (length, value written)
    pending: list[tuple[int, torch.Tensor, float]] = []  # (step, per-layer sums on the GPU, expected)
    big = torch.randn(2048, 2048, device="cuda")
    try:
        for step in range(400):
            if cache.num_free_slots and rng.random() < 0.4:
                slot = cache.allocate_slot()
                live[slot] = (rng.randint(1, 300), float(step % 7 + 1))
            for slot in list(live):
                length, value = live[slot]
                grown = min(spec.max_model_len, length + rng.randint(0, 200))
                if rng.random() < 0.08 or not cache.reserve_tokens(slot, grown):
                    del live[slot]
                    cache.free_slot(slot)
                    continue
                live[slot] = (grown, value)
            for slot, (length, value) in live.items():
                for layer in range(spec.num_layers):
                    cache.key_cache[layer][slot, :length] = value
                    cache.value_cache[layer][slot, :length] = -value
                big = (big @ big).clamp_(-1, 1)  # keep the GPU busy so reads stay queued behind it
                total = torch.stack([cache.key_cache[layer][slot, :length].double().sum()
                                     for layer in range(spec.num_layers)])
                pending.append((step, total, value * length * spec.num_kv_heads * spec.head_dim))
            cache.step_queued()
            cache.prepare_next_step({slot: length + 64 for slot, (length, _) in live.items()})
            if step % 10 == 9:
                check_sums(pending)
        check_sums(pending)
        cache.wait_for_map_ahead()
        torch.cuda.synchronize()
        assert cache.stats.pages_unmapped > 0 and cache.stats.pages_mapped_ahead > 0
    finally:
        cache.close()


def check_sums(pending: list[tuple[int, torch.Tensor, float]]) -> None:
    for step, total, expected in pending:
        assert torch.all(total.cpu() == expected), (step, total.tolist(), expected)
    pending.clear()
