"""flashinfer over the slot layout equals per-sequence SDPA, for contiguous and vAttention (strided) caches.

NOT YET RUN ON A GPU (written 2026-11-21 without one).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from fusedserve.engine.kv_cache import KVCacheSpec
from fusedserve.kernels.attention import SlotBatch, attend, attend_each_sequence
from fusedserve.kernels.gpu import flashinfer_attention as fa

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("flashinfer") is None, reason="pip install -e '.[gpu]'"),
]

HEADS, KV_HEADS, HEAD_DIM, MAX_LEN, SLOTS = 8, 2, 64, 512, 6
# A mixed step: decodes (slot 4 at 300 tokens, slot 1 at 1, slot 5 at the maximum), a first prefill (slot 0) and
# a later chunk of a longer prompt (slot 2: 40 new tokens after 100 cached).
BATCH = dict(slots=[4, 0, 1, 2, 5], query_lens=[1, 33, 1, 40, 1], context_lens=[300, 33, 1, 140, MAX_LEN])


def random_caches(layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    if layout == "contiguous":
        shape = (SLOTS, MAX_LEN, KV_HEADS, HEAD_DIM)
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16), torch.randn(shape, device="cuda",
                                                                                   dtype=torch.bfloat16)
    buffer = torch.randn(SLOTS, MAX_LEN, 4, 2, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    return buffer[:, :, 2, 0], buffer[:, :, 2, 1]  # layer 2 of an "all_layers" record


def sdpa_reference(q, key_cache, value_cache, batch, scale):
    out = torch.empty_like(q)
    attend_each_sequence(q, key_cache, value_cache, batch, scale, out, skip_single_tokens=False)
    return out.reshape(q.shape[0], -1)


@pytest.mark.parametrize("layout", ["contiguous", "all_layers"])
def test_flashinfer_decode_and_prefill_equal_sdpa(layout):
    key_cache, value_cache = random_caches(layout)
    batch = SlotBatch.build(**BATCH, device="cuda")
    q = torch.randn(batch.num_tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    assert fa.flashinfer_can_read(q, key_cache, value_cache) is None
    got = attend(q, key_cache, value_cache, batch, HEAD_DIM**-0.5)
    expected = sdpa_reference(q, key_cache, value_cache, batch, HEAD_DIM**-0.5)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_the_decode_plan_is_made_once_per_batch_not_per_layer(monkeypatch):
    key_cache, value_cache = random_caches("contiguous")
    batch = SlotBatch.build(**BATCH, device="cuda")
    q = torch.randn(batch.num_tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    backend = fa.flashinfer_backend(q.device)
    plans = []
    original = backend.decode_wrapper.plan
    monkeypatch.setattr(backend.decode_wrapper, "plan", lambda *a, **k: (plans.append(1), original(*a, **k)))
    for _ in range(3):  # three layers
        attend(q, key_cache, value_cache, batch, HEAD_DIM**-0.5)
    assert len(plans) == 1
    attend(q, key_cache, value_cache, SlotBatch.build(**BATCH, device="cuda"), HEAD_DIM**-0.5)
    assert len(plans) == 2


def test_flashinfer_reads_a_vattention_cache_over_cuda_vmm_pages():
    pytest.importorskip("cuda.bindings.driver")
    from fusedserve.engine.vattention.kv_cache import VAttentionKVCache

    spec = KVCacheSpec(num_layers=2, max_num_seqs=SLOTS, max_model_len=MAX_LEN, num_kv_heads=KV_HEADS,
                       head_dim=HEAD_DIM, dtype=torch.bfloat16)
    cache = VAttentionKVCache(spec, 2 * 1024 * 1024, 8 * 2 * 1024 * 1024, "cuda", layout="all_layers")
    try:
        batch = SlotBatch.build(**BATCH, device="cuda")
        assert sorted(cache.allocate_slot() for _ in range(SLOTS)) == list(range(SLOTS))
        for slot, length in zip(BATCH["slots"], BATCH["context_lens"], strict=True):
            assert cache.reserve_tokens(slot, length)
            for layer in range(2):
                cache.key_cache[layer][slot, :length] = torch.randn(length, KV_HEADS, HEAD_DIM, device="cuda")
                cache.value_cache[layer][slot, :length] = torch.randn(length, KV_HEADS, HEAD_DIM, device="cuda")
        q = torch.randn(batch.num_tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        for layer in range(2):
            k, v = cache.key_cache[layer], cache.value_cache[layer]
            got = attend(q, k, v, batch, 0.125)
            torch.testing.assert_close(got.float(), sdpa_reference(q, k, v, batch, 0.125).float(), rtol=2e-2,
                                       atol=2e-2)
        torch.cuda.synchronize()
    finally:
        cache.close()


def test_fp32_caches_fall_back_to_sdpa():
    key_cache = torch.randn(SLOTS, MAX_LEN, KV_HEADS, HEAD_DIM, device="cuda")
    value_cache = torch.randn_like(key_cache)
    batch = SlotBatch.build(**BATCH, device="cuda")
    q = torch.randn(batch.num_tokens, HEADS, HEAD_DIM, device="cuda")
    assert "dtypes" in fa.flashinfer_can_read(q, key_cache, value_cache)
    torch.testing.assert_close(attend(q, key_cache, value_cache, batch, 0.125),
                               sdpa_reference(q, key_cache, value_cache, batch, 0.125))
