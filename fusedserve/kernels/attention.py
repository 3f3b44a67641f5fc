"""Attention over the vAttention KV layout: one entry point, a backend per device.

Each sequence owns one slot of the per-layer caches [max_num_seqs, max_model_len, kv_heads, head_dim]. The
kernels read only `cache[slot, :context_len]` — never past a slot's length, because a demand-paged backend leaves
that memory unmapped (on a CPU, reading it is a SIGSEGV, not an exception). No block tables exist.
Backends: the CPU's C++ decode kernel plus SDPA per sequence (here); CUDA's flashinfer kernels, or the same SDPA
loop where flashinfer is missing (kernels/gpu/flashinfer_attention.py, imported only when a CUDA tensor arrives).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fusedserve.kernels.cpu.extensions import load_cpp_extension
from fusedserve.kernels.norm_rope import apply_rope


@dataclass
class SlotBatch:
    """Where each sequence's new tokens sit in the flat batch and in the cache.

    Sequence i contributes tokens [token_starts[i], token_starts[i] + query_lens[i]) of the flat batch; their
    positions are [context_lens[i] - query_lens[i], context_lens[i]) in slot slots[i].
    """

    slots: list[int]
    query_lens: list[int]
    context_lens: list[int]
    token_starts: list[int]
    slot_of_token: torch.Tensor  # [T] long: the slot each flat token writes to
    position_of_token: torch.Tensor  # [T] long: its position in that slot
    decode_rows: torch.Tensor  # [D] long: flat rows of the sequences with a single new token
    decode_slots: torch.Tensor  # [D] long: their slots
    decode_context_lens: torch.Tensor  # [D] long: their context lengths

    @classmethod
    def build(
        cls, slots: list[int], query_lens: list[int], context_lens: list[int], device: torch.device | str = "cpu"
    ) -> SlotBatch:
        """The batch's index tensors on `device` (the model's); the lists stay host-side for planning."""
        token_starts, slot_of_token, position_of_token, offset = [], [], [], 0
        for slot, q_len, ctx_len in zip(slots, query_lens, context_lens, strict=True):
            token_starts.append(offset)
            slot_of_token.extend([slot] * q_len)
            position_of_token.extend(range(ctx_len - q_len, ctx_len))
            offset += q_len
        decodes = [i for i, q_len in enumerate(query_lens) if q_len == 1]
        return cls(
            slots=slots,
            query_lens=query_lens,
            context_lens=context_lens,
            token_starts=token_starts,
            slot_of_token=torch.tensor(slot_of_token, dtype=torch.long, device=device),
            position_of_token=torch.tensor(position_of_token, dtype=torch.long, device=device),
            decode_rows=torch.tensor([token_starts[i] for i in decodes], dtype=torch.long, device=device),
            decode_slots=torch.tensor([slots[i] for i in decodes], dtype=torch.long, device=device),
            decode_context_lens=torch.tensor([context_lens[i] for i in decodes], dtype=torch.long, device=device),
        )

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)


def write_kv(
    key_cache: torch.Tensor, value_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: SlotBatch
) -> None:
    """Store the new tokens' K/V ([T, kv_heads, head_dim]) at their (slot, position)."""
    # Indexed assignment, not index_put_: on the strided views of a vAttention cache index_put_ measured 20x slower.
    key_cache[batch.slot_of_token, batch.position_of_token] = k.to(key_cache.dtype)
    value_cache[batch.slot_of_token, batch.position_of_token] = v.to(value_cache.dtype)


def rope_and_store_kv(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    batch: SlotBatch,
    num_heads: int,
    num_kv_heads: int,
) -> torch.Tensor:
    """Rotate q and k of a fused projection qkv [T, (H + 2 KVH) * D] by position (cos, sin [T, D]), store k and
    v at each token's (slot, position) and return the rotated q [T, H, D]. On a CPU one C++ call does it all
    (kernels/cpu/norm_rope.cpp); elsewhere split + apply_rope + write_kv."""
    head_dim = key_cache.shape[-1]
    if qkv.device.type == "cpu" and qkv.dtype in (torch.float32, torch.bfloat16) and qkv.stride(-1) == 1:
        kernel = load_cpp_extension("norm_rope.cpp")
        if kernel is not None and key_cache.stride(-1) == 1 and value_cache.stride(-1) == 1:
            return kernel.rope_store_kv(
                qkv, cos, sin, key_cache, value_cache, batch.slot_of_token, batch.position_of_token,
                num_heads, num_kv_heads,
            )
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = apply_rope(q.view(-1, num_heads, head_dim), cos, sin)
    k = apply_rope(k.view(-1, num_kv_heads, head_dim), cos, sin)
    write_kv(key_cache, value_cache, k, v.view(-1, num_kv_heads, head_dim), batch)
    return q


def attend(
    q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, batch: SlotBatch, scale: float
) -> torch.Tensor:
    """Causal attention of q [T, heads, head_dim] over each sequence's cached context; returns [T, heads*head_dim].

    The new tokens' K/V must already be written (rope_and_store_kv or write_kv). Query token j of a sequence with
    q_len new tokens and context_len cached tokens sees positions [0, context_len - q_len + j].
    """
    if q.device.type == "cuda":
        from fusedserve.kernels.gpu.flashinfer_attention import attend_cuda

        return attend_cuda(q, key_cache, value_cache, batch, scale)
    num_tokens, num_heads, head_dim = q.shape
    kernel = load_cpp_extension("decode_attention.cpp") if q.device.type == "cpu" else None
    if kernel is not None and batch.decode_rows.numel() == num_tokens:
        # A pure decode step (token i is sequence i's only new token): no gather and no scatter of rows.
        out = kernel.decode_attention(
            q.float().contiguous(), key_cache, value_cache, batch.decode_slots, batch.decode_context_lens, scale
        )
        return out.to(q.dtype).reshape(num_tokens, num_heads * head_dim)
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if kernel is not None and batch.decode_rows.numel():
        # All single-token queries in one call: a Python loop of tiny SDPA calls costs ~80 us per sequence.
        rows = batch.decode_rows
        out[rows] = kernel.decode_attention(
            q.index_select(0, rows).float().contiguous(),
            key_cache,
            value_cache,
            batch.decode_slots,
            batch.decode_context_lens,
            scale,
        ).to(q.dtype)
    attend_each_sequence(q, key_cache, value_cache, batch, scale, out, skip_single_tokens=kernel is not None)
    return out.reshape(num_tokens, num_heads * head_dim)


def attend_each_sequence(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    batch: SlotBatch,
    scale: float,
    out: torch.Tensor,
    skip_single_tokens: bool,
) -> None:
    """SDPA per sequence over cache[slot, :context_len], written into out [T, heads, head_dim] (any device).

    `skip_single_tokens`: leave the single-token (decode) sequences to a batched kernel that already ran.
    """
    for slot, q_len, ctx_len, start in zip(
        batch.slots, batch.query_lens, batch.context_lens, batch.token_starts, strict=True
    ):
        if skip_single_tokens and q_len == 1:
            continue
        query = q[start : start + q_len].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
        keys = key_cache[slot, :ctx_len].transpose(0, 1).unsqueeze(0).to(q.dtype)  # [1, KVH, ctx, D]
        values = value_cache[slot, :ctx_len].transpose(0, 1).unsqueeze(0).to(q.dtype)
        mask, causal = _causal_mask(q_len, ctx_len, q.device)
        result = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, is_causal=causal, scale=scale, enable_gqa=True
        )
        out[start : start + q_len] = result[0].transpose(0, 1)


def _causal_mask(q_len: int, ctx_len: int, device: torch.device) -> tuple[torch.Tensor | None, bool]:
    if q_len == 1:
        return None, False  # a single newest token sees the whole context
    if q_len == ctx_len:
        return None, True  # square, top-left aligned: SDPA's own causal mask
    offset = ctx_len - q_len
    rows = torch.arange(q_len, device=device).unsqueeze(1) + offset
    return torch.arange(ctx_len, device=device).unsqueeze(0) <= rows, False
