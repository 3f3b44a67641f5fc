"""Attention on CUDA over the vAttention KV tensors: flashinfer's kernels without block tables, or SDPA.

NOT YET RUN ON A GPU (as of 2026-11-21): written against flashinfer-python 0.7.2's sources (the decode wrapper's
plan/run, single_prefill_with_kv_cache, the strided paged_kv_t) with no CUDA device at hand. The planning
arguments and the eligibility checks are plain tensor code and unit-tested on the CPU
(tests/unit/test_gpu_planning.py); the kernel calls are tested only by tests/gpu/, which must pass on a GPU
before this path is relied on.

How the slot layout becomes flashinfer's: a layer's cache [max_num_seqs, max_model_len, kv_heads, head_dim]
(NHD) is exactly a paged cache whose page size is max_model_len and whose page p is slot p. So batched decode
presents each sequence as ONE page: page table = its slot, indptr = 0..B, last-page length = its context
length. flashinfer reads the tensors' strides (non-contiguous caches are supported since 0.2.0), so the
"all_layers" layout — per-layer views with a token stride of 2·L rows — is read in place, no copy. Prefill
chunks run one sequence at a time through single_prefill_with_kv_cache on cache[slot, :len] with a causal mask
aligned bottom-right (query j of a chunk of q_len sees positions [0, len - q_len + j]).
Where flashinfer is not installed or cannot read the tensors (fp32, a head size it has no kernel for, a slot
stride beyond its 32-bit page stride), every sequence goes through the same per-sequence SDPA as the CPU path.
Kernels read only [slot, :len]: unmapped pages behind a slot's length fault on a GPU too.

This module owns one piece of state: a flashinfer workspace and decode wrapper per CUDA device (`_BACKENDS`),
used only by the engine thread. It never writes the KV cache (write_kv does) and never maps memory.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

from fusedserve.kernels.attention import SlotBatch, attend_each_sequence

FLASHINFER_DTYPES = (torch.float16, torch.bfloat16)
FLASHINFER_HEAD_DIMS = (64, 128, 256)  # head sizes flashinfer's decode/prefill templates are instantiated for
MAX_STRIDE_ELEMENTS = 2**32 - 1  # paged_kv_t keeps stride_page / stride_n / stride_h in uint32
WORKSPACE_BYTES = 128 * 1024 * 1024  # flashinfer's documented default for the float workspace


@dataclass(frozen=True)
class DecodePlan:
    """The arguments of BatchDecodeWithPagedKVCacheWrapper.plan for one step's decode sequences."""

    indptr: torch.Tensor  # [B + 1] int32: sequence b's pages are indices[indptr[b]:indptr[b + 1]] — one each
    indices: torch.Tensor  # [B] int32: that one page is the sequence's slot
    last_page_len: torch.Tensor  # [B] int32: tokens used in it — the context length
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int  # max_model_len: one page spans a whole slot
    q_data_type: torch.dtype
    kv_data_type: torch.dtype
    sm_scale: float

    def plan_call(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """(args, kwargs) for wrapper.plan(*args, **kwargs); optional ones by keyword, as flashinfer asks."""
        args = (
            self.indptr,
            self.indices,
            self.last_page_len,
            self.num_qo_heads,
            self.num_kv_heads,
            self.head_dim,
            self.page_size,
        )
        kwargs = {"q_data_type": self.q_data_type, "kv_data_type": self.kv_data_type, "sm_scale": self.sm_scale}
        return args, kwargs


def decode_plan_arguments(
    slots: list[int],
    context_lens: list[int],
    max_model_len: int,
    num_qo_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_dtype: torch.dtype,
    kv_dtype: torch.dtype,
    scale: float,
    num_slots: int | None = None,
) -> DecodePlan:
    """Present each decode sequence's slot as one page of max_model_len tokens (host tensors: plan wants them)."""
    if len(slots) != len(context_lens):
        raise ValueError(f"{len(slots)} slots but {len(context_lens)} context lengths")
    if len(set(slots)) != len(slots):
        raise ValueError(f"a slot appears twice in one decode batch: {slots}")
    for slot, length in zip(slots, context_lens, strict=True):
        if slot < 0 or (num_slots is not None and slot >= num_slots):
            raise ValueError(f"slot {slot} is outside the cache's {num_slots} slots")
        if not 1 <= length <= max_model_len:
            raise ValueError(f"context length {length} of slot {slot} is outside [1, {max_model_len}]")
    if num_qo_heads % num_kv_heads:
        raise ValueError(f"{num_qo_heads} query heads are not a multiple of {num_kv_heads} KV heads")
    return DecodePlan(
        indptr=torch.arange(len(slots) + 1, dtype=torch.int32),
        indices=torch.tensor(slots, dtype=torch.int32),
        last_page_len=torch.tensor(context_lens, dtype=torch.int32),
        num_qo_heads=num_qo_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        page_size=max_model_len,
        q_data_type=q_dtype,
        kv_data_type=kv_dtype,
        sm_scale=scale,
    )


def decode_plan_for_batch(batch: SlotBatch, q: torch.Tensor, key_cache: torch.Tensor, scale: float) -> DecodePlan:
    """The plan for the batch's single-token sequences, in the order of batch.decode_rows."""
    decodes = [i for i, q_len in enumerate(batch.query_lens) if q_len == 1]
    return decode_plan_arguments(
        [batch.slots[i] for i in decodes],
        [batch.context_lens[i] for i in decodes],
        max_model_len=key_cache.shape[1],
        num_qo_heads=q.shape[1],
        num_kv_heads=key_cache.shape[2],
        head_dim=q.shape[2],
        q_dtype=q.dtype,
        kv_dtype=key_cache.dtype,
        scale=scale,
        num_slots=key_cache.shape[0],
    )


def flashinfer_can_read(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor) -> str | None:
    """None when flashinfer's kernels can read these tensors in place, else the reason they cannot."""
    if q.dtype not in FLASHINFER_DTYPES or key_cache.dtype != q.dtype or value_cache.dtype != q.dtype:
        return f"dtypes q={q.dtype}, kv={key_cache.dtype} (flashinfer takes fp16/bf16, q and kv alike)"
    head_dim = q.shape[-1]
    if head_dim not in FLASHINFER_HEAD_DIMS:
        return f"head_dim {head_dim} (flashinfer kernels: {FLASHINFER_HEAD_DIMS})"
    if key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        return f"cache shapes {tuple(key_cache.shape)} / {tuple(value_cache.shape)}"
    if key_cache.stride() != value_cache.stride():
        return f"K strides {key_cache.stride()} differ from V strides {value_cache.stride()}"
    if key_cache.stride(-1) != 1:
        return "the head dimension is not contiguous"
    if max(key_cache.stride()) > MAX_STRIDE_ELEMENTS:
        return f"a slot stride of {key_cache.stride(0)} elements overflows flashinfer's 32-bit page stride"
    element = key_cache.element_size()
    if any((stride * element) % 16 for stride in key_cache.stride()[:-1]) or key_cache.data_ptr() % 16:
        return "rows are not 16-byte aligned (flashinfer loads 16-byte vectors)"
    return None


def load_flashinfer() -> ModuleType | None:
    """flashinfer (pip install 'fusedserve[gpu]'), or None where it is not installed."""
    try:
        return importlib.import_module("flashinfer")
    except ImportError:
        return None


class FlashInferAttention:
    """flashinfer on one device: a workspace and a decode wrapper, planned once per batch (not per layer)."""

    def __init__(self, device: torch.device, flashinfer: ModuleType) -> None:
        self.flashinfer = flashinfer
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.decode_wrapper = flashinfer.BatchDecodeWithPagedKVCacheWrapper(self.workspace, "NHD")
        self._planned_batch: SlotBatch | None = None  # held, so its identity cannot be reused while cached
        self._planned_key: tuple[Any, ...] | None = None

    def decode(
        self, q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, batch: SlotBatch, scale: float
    ) -> torch.Tensor:
        """Attention of the batch's single-token sequences (q rows batch.decode_rows): [D, heads, head_dim]."""
        key = (q.shape[1:], q.dtype, key_cache.shape, key_cache.dtype, scale)
        if self._planned_batch is not batch or self._planned_key != key:
            args, kwargs = decode_plan_for_batch(batch, q, key_cache, scale).plan_call()
            self.decode_wrapper.plan(*args, **kwargs)
            self._planned_batch, self._planned_key = batch, key
        return self.decode_wrapper.run(q.index_select(0, batch.decode_rows), (key_cache, value_cache))

    def prefill(
        self,
        q: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        batch: SlotBatch,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        """Each multi-token chunk over cache[slot, :len], causal and aligned to the chunk's end, into out."""
        for slot, q_len, ctx_len, start in zip(
            batch.slots, batch.query_lens, batch.context_lens, batch.token_starts, strict=True
        ):
            if q_len == 1:
                continue
            out[start : start + q_len] = self.flashinfer.single_prefill_with_kv_cache(
                q[start : start + q_len],
                key_cache[slot, :ctx_len],
                value_cache[slot, :ctx_len],
                causal=True,
                kv_layout="NHD",
                sm_scale=scale,
            )


_BACKENDS: dict[torch.device, FlashInferAttention | None] = {}  # per device; None: flashinfer not installed


def flashinfer_backend(device: torch.device) -> FlashInferAttention | None:
    if device not in _BACKENDS:
        module = load_flashinfer()
        _BACKENDS[device] = FlashInferAttention(device, module) if module is not None else None
    return _BACKENDS[device]


def attend_cuda(
    q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, batch: SlotBatch, scale: float
) -> torch.Tensor:
    """attention.attend for CUDA tensors: same contract, [T, heads * head_dim] out."""
    num_tokens, num_heads, head_dim = q.shape
    out = torch.empty_like(q)
    backend = flashinfer_backend(q.device)
    if backend is None or flashinfer_can_read(q, key_cache, value_cache) is not None:
        attend_each_sequence(q, key_cache, value_cache, batch, scale, out, skip_single_tokens=False)
        return out.reshape(num_tokens, num_heads * head_dim)
    if batch.decode_rows.numel():
        out[batch.decode_rows] = backend.decode(q, key_cache, value_cache, batch, scale)
    backend.prefill(q, key_cache, value_cache, batch, scale, out)
    return out.reshape(num_tokens, num_heads * head_dim)
