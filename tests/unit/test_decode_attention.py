"""The CPU decode attention kernel equals SDPA, reads only each slot's context, and rejects bad slots and lengths.

Every path of kernels/cpu/decode_attention.cpp is reached: AMX (bf16 caches, head_dim % 32 == 0, <= 16 heads, where
the CPU has it), AVX-512 (float32 caches, more than 16 heads, head_dim 80) and the scalar loops (head_dim 48). The
reference is SDPA in float64 over the same cache rows, one sequence at a time.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from fusedserve.kernels.attention import SlotBatch, attend, attend_each_sequence
from fusedserve.kernels.cpu.extensions import load_cpp_extension

KERNEL = load_cpp_extension("decode_attention.cpp")
pytestmark = pytest.mark.skipif(KERNEL is None, reason="C++ extension unavailable")
DTYPES = [torch.float32, torch.bfloat16]
# float32 caches: fp32 dots; bf16 caches on AMX: q as bf16 hi + lo (~2^-18 relative), so a looser atol.
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 2e-6}, torch.bfloat16: {"rtol": 1e-4, "atol": 2e-5}}


def reference(q, k_cache, v_cache, slots, lens, scale):
    """SDPA (float64) of each q[b] [H, D] over cache[slots[b], :lens[b]]."""
    out = torch.empty(q.shape, dtype=torch.float64)
    for b, (slot, length) in enumerate(zip(slots.tolist(), lens.tolist(), strict=True)):
        keys = k_cache[slot, :length].transpose(0, 1).double()  # [KVH, length, D]
        values = v_cache[slot, :length].transpose(0, 1).double()
        query = q[b].double().unsqueeze(1)  # [H, 1, D]
        out[b] = F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=True).squeeze(1)
    return out


def random_caches(slots, max_len, kv_heads, head_dim, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (slots, max_len, kv_heads, head_dim)
    return torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype)


def check(q, k_cache, v_cache, slots, lens, scale=None, tolerance=None):
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    got = KERNEL.decode_attention(q, k_cache, v_cache, slots, lens, scale)
    expected = reference(q, k_cache, v_cache, slots, lens, scale)
    torch.testing.assert_close(got.double(), expected, **(tolerance or TOLERANCE[k_cache.dtype]))


@pytest.fixture
def threads(request):
    """torch's thread count for one test (the kernel splits tokens over at::get_num_threads())."""
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch", [1, 33])
@pytest.mark.parametrize("length", [1, 15, 16, 17, 1000])
def test_decode_attention_matches_sdpa_over_gqa_heads(dtype, batch, length):
    k_cache, v_cache = random_caches(40, 1024, 3, 64, dtype)  # SmolLM2-135M: 9 query heads over 3 kv heads
    slots = torch.randperm(40, generator=torch.Generator().manual_seed(batch))[:batch]
    q = torch.randn(batch, 9, 64)
    check(q, k_cache, v_cache, slots, torch.full((batch,), length))


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sequences_split_between_threads_merge_to_sdpa(threads, dtype):
    # 2020 tokens over 2 threads: the cut falls inside the 700-token sequence; B=1 at 1000 tokens is cut in two.
    k_cache, v_cache = random_caches(8, 1024, 3, 64, dtype)
    lens = torch.tensor([1000, 3, 300, 17, 700])
    check(torch.randn(5, 9, 64), k_cache, v_cache, torch.tensor([7, 0, 3, 5, 1]), lens)
    check(torch.randn(1, 9, 64), k_cache, v_cache, torch.tensor([2]), torch.tensor([1000]))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"),
    [(8, 8, 64), (8, 1, 128), (32, 8, 128), (4, 2, 80), (4, 2, 48), (6, 2, 32)],
    ids=["mha", "group8-d128", "32heads", "d80-avx", "d48-scalar", "d32"],
)
def test_head_shapes_match_sdpa(dtype, heads, kv_heads, head_dim):
    k_cache, v_cache = random_caches(6, 300, kv_heads, head_dim, dtype)
    lens = torch.tensor([300, 1, 47, 160])
    check(torch.randn(4, heads, head_dim), k_cache, v_cache, torch.tensor([5, 0, 2, 3]), lens, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_logits_keep_the_running_max_exact(dtype):
    # Logits in the hundreds, rising along the context: every block moves the running max, and exp2 underflows.
    # A float32 logit of ~300 is itself rounded by ~2e-5, hence the looser bound (still far below a wrong max).
    k_cache, v_cache = random_caches(2, 512, 3, 64, dtype)
    k_cache[0] *= torch.linspace(0.1, 4.0, 512).view(512, 1, 1).to(dtype)
    q, slots, lens = 30 * torch.randn(2, 9, 64), torch.tensor([0, 1]), torch.tensor([512, 333])
    check(q, k_cache, v_cache, slots, lens, tolerance={"rtol": 1e-3, "atol": 1e-4})


@pytest.mark.parametrize("dtype", DTYPES)
def test_reads_per_layer_views_of_an_all_layers_buffer(dtype):
    buffer = torch.randn(6, 200, 4, 2, 3, 64).to(dtype)  # [slot, token, layer, K/V, kv_head, head_dim]
    k_cache, v_cache = buffer[:, :, 2, 0], buffer[:, :, 2, 1]
    assert not k_cache.is_contiguous()
    check(torch.randn(3, 9, 64), k_cache, v_cache, torch.tensor([4, 1, 5]), torch.tensor([200, 17, 64]))


def test_bad_slots_and_lengths_raise_before_any_read():
    k_cache, v_cache = random_caches(4, 32, 3, 64, torch.float32)
    q = torch.randn(2, 9, 64)
    for slots, lens, message in [
        ([0, 4], [5, 5], "slot out of range"),
        ([-1, 0], [5, 5], "slot out of range"),
        ([0, 1], [0, 5], "context length out of range"),
        ([0, 1], [5, 33], "context length out of range"),
        ([0], [5], "one per query row"),
    ]:
        with pytest.raises(RuntimeError, match=message):
            KERNEL.decode_attention(q, k_cache, v_cache, torch.tensor(slots), torch.tensor(lens), 0.125)


GUARD_PAGE_SCRIPT = textwrap.dedent(
    """
    import torch, torch.nn.functional as F
    from fusedserve.engine.vattention.cpu_backend import CpuMemoryBackend
    from fusedserve.kernels.cpu.extensions import load_cpp_extension

    def guarded_cache(backend, slots, length, dtype):
        # [slots, length + spare, 3, 64]: each slot's tokens [0, length) mapped, token `length` on an unmapped page.
        page, elem = backend.granularity, torch.empty((), dtype=dtype).element_size()
        token = 3 * 64 * elem
        data = -(-length * token // page) * page
        stride = data + page
        base = backend.reserve(slots * stride)
        for s in range(slots):
            backend.map(base + s * stride, data, backend.create_physical(data))
            backend.set_access(base + s * stride, data)
        flat = backend.wrap_tensor(base, slots * stride).view(dtype)
        shape = (slots, length + page // token, 3, 64)
        cache = flat.as_strided(shape, (stride // elem, token // elem, 64, 1), (data - length * token) // elem)
        cache[:, :length] = torch.randn(slots, length, 3, 64).to(dtype)
        return cache

    kernel, backend = load_cpp_extension("decode_attention.cpp"), CpuMemoryBackend()
    for dtype in (torch.float32, torch.bfloat16):
        for length in (1, 15, 16, 17, 40):
            k, v = guarded_cache(backend, 2, length, dtype), guarded_cache(backend, 2, length, dtype)
            q, slots, lens = torch.randn(2, 9, 64), torch.tensor([1, 0]), torch.tensor([length, length])
            got = kernel.decode_attention(q, k, v, slots, lens, 0.125)
            for b, slot in enumerate(slots.tolist()):
                keys, values = (c[slot, :length].transpose(0, 1).double() for c in (k, v))
                want = F.scaled_dot_product_attention(q[b].double().unsqueeze(1), keys, values, scale=0.125,
                                                      enable_gqa=True).squeeze(1)
                assert torch.allclose(got[b].double(), want, rtol=1e-4, atol=2e-5), (dtype, length)
    print("ok")
    """
)


def test_never_reads_past_a_slots_context_on_demand_paged_memory():
    # The page after each slot's last token is unmapped: one stray read (a tile row, a vector tail) is a SIGSEGV,
    # so the check runs in a child process.
    child = subprocess.run([sys.executable, "-c", GUARD_PAGE_SCRIPT], capture_output=True, text=True, timeout=300)
    assert child.returncode == 0 and child.stdout.strip() == "ok", (child.returncode, child.stderr[-2000:])


def test_attend_equals_sdpa_for_a_mixed_prefill_and_decode_step():
    k_cache, v_cache = random_caches(6, 64, 3, 64, torch.float32)
    batch = SlotBatch.build(slots=[4, 2, 1, 5], query_lens=[1, 7, 1, 1], context_lens=[33, 20, 1, 64])
    q = torch.randn(batch.num_tokens, 9, 64)
    expected = torch.empty(batch.num_tokens, 9, 64)
    attend_each_sequence(q, k_cache, v_cache, batch, 0.125, expected, skip_single_tokens=False)
    got = attend(q, k_cache, v_cache, batch, 0.125).view(batch.num_tokens, 9, 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=2e-6)
