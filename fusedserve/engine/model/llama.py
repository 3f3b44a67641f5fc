"""Our Llama-family decoder for inference: reads the engine's KV cache slots, computes logits only where asked.

It never decides what runs (the scheduler does) and never allocates KV memory (the KV cache does). Linear layers
come in through `kernels.linear.Linear`, so LaRoSA's sparse layers replace dense ones without touching this file;
LaRoSA's residual adapters (one d x d matrix per layer) are applied to the residual stream before their layer,
and a LaRoSA model may carry a `DenseTwin` (engine/larosa/dense_twin.py) that it hands its large steps to.

Mixed precision (`--dtype auto` on a CPU): when every linear keeps a bf16 copy of its fp32 weights, a step with
enough tokens runs its blocks in bf16 — the normalised input is cast once, q/k/v, attention, the MLP and the
linears stay bf16 — while the residual stream, the norms' statistics and the logits stay fp32. Such a model also
keeps its KV cache in bf16: decode attention is memory-bound, and halving the bytes it reads halves its time.
On a CPU without AMX, steps of FP32_GEMM_MIN_ROWS_WITHOUT_AMX tokens or more compute in fp32 instead.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fusedserve.engine.model.arch import LlamaArch
from fusedserve.engine.model.rope import RotaryEmbedding
from fusedserve.kernels.attention import SlotBatch, attend, rope_and_store_kv
from fusedserve.kernels.linear import Linear, ResidualAdapter
from fusedserve.kernels.norm_rope import add_rms_norm, rms_norm, silu_mul
from fusedserve.kernels.sparse_linear import at_thread_count


@dataclass
class DecoderLayer:
    input_norm: torch.Tensor | None  # None when the scale is folded into the following linears (LaRoSA)
    post_attention_norm: torch.Tensor | None
    qkv_proj: Linear  # q, k and v stacked along the output dimension: one matrix multiply
    o_proj: Linear
    gate_up_proj: Linear  # gate and up stacked
    down_proj: Linear
    residual_adapter: torch.Tensor | None = None  # [d, d]: h <- h @ A before this layer (LaRoSA)


class StepTimings:
    """Seconds per step, by thread count, step size and path (sparse model or dense twin): the measured half
    of the choice between them. The static break-even (DenseTwin.from_tokens) comes from kernel timings on one
    host; on another (a faster memory system speeds up the dense GEMV more than the sparse kernel) the sparse
    model can lose where that table says it wins. So for the step sizes the table leaves to the sparse model,
    both paths are tried PROBES times each, the one with the lower minimum over its recent steps serves (noise
    only ever adds time, and a median of three alternating probes picked the slower path in one benchmark run),
    and every REPROBE_EVERY steps the other path runs once, so a change of load is noticed. The first re-probes
    come sooner (EARLY_REPROBES): three probes taken during a burst of other load once fixed the slower path for
    the whole of a 64-step benchmark (batch 4: the sparse path at 0.92 of dense served, 0.95 overall).
    Steps of one size differ in context length, which costs both paths the same attention time."""

    PROBES = 3
    REPROBE_EVERY = 64
    EARLY_REPROBES = (11, 21, 41)  # step indexes (of one size) that also run the other path
    WINDOW = 8

    def __init__(self) -> None:
        self._seconds: dict[tuple[int, int, bool], deque[float]] = {}
        self._steps: dict[tuple[int, int], int] = {}

    def prefers_twin(self, threads: int, num_tokens: int) -> bool:
        sparse, dense = (self._seconds.get((threads, num_tokens, twin), ()) for twin in (False, True))
        if len(sparse) < self.PROBES or len(dense) < self.PROBES:
            return len(dense) < len(sparse)  # alternate until both have their probes
        faster_twin = min(dense) < min(sparse)
        steps = self._steps.get((threads, num_tokens), 0)
        reprobe = steps % self.REPROBE_EVERY == self.REPROBE_EVERY - 1 or steps in self.EARLY_REPROBES
        return faster_twin != reprobe

    def record(self, threads: int, num_tokens: int, twin: bool, seconds: float) -> None:
        self._seconds.setdefault((threads, num_tokens, twin), deque(maxlen=self.WINDOW)).append(seconds)
        self._steps[(threads, num_tokens)] = self._steps.get((threads, num_tokens), 0) + 1


@dataclass
class DenseTwin:
    """An equivalent model without per-layer residual bases that computes this one's steps of many tokens."""

    model: LlamaModel
    # torch thread count -> steps of at least this many tokens go to the twin (sparse kernels pay less with more
    # threads, as dense matmuls scale better); the largest count <= the current one applies. Smaller steps go
    # to whichever path `timings` measures faster.
    from_tokens: dict[int, int]
    to_final_basis: torch.Tensor  # [d, d]: the twin's final hidden states -> this model's final basis
    timings: StepTimings = field(default_factory=StepTimings)

    def timed(self, num_tokens: int) -> bool:
        """Whether steps of this size go to the faster path as measured (else always to the twin)."""
        return num_tokens < at_thread_count(self.from_tokens, torch.get_num_threads())


class LlamaModel:
    def __init__(
        self,
        arch: LlamaArch,
        embed_tokens: torch.Tensor,
        layers: list[DecoderLayer],
        final_norm: torch.Tensor | None,
        lm_head: Linear,
        max_positions: int,
    ) -> None:
        self.arch = arch
        self.embed_tokens = embed_tokens
        self.layers = layers
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.rope = RotaryEmbedding(arch, max_positions, embed_tokens.dtype, embed_tokens.device)
        self.scale = arch.head_dim**-0.5
        self._bf16_from_rows = _shared_threshold(layers, "bf16_min_rows")
        # The KV cache's dtype, for whoever allocates it: bf16 for a mixed-precision model (see the module doc).
        self.kv_dtype = torch.bfloat16 if self._bf16_from_rows is not None else embed_tokens.dtype
        # Without AMX, bf16 products and attention of large steps lose to fp32 (kernels/linear.py): steps the linears
        # multiply in fp32 run all their blocks in fp32 (130-token prefills, 1 thread: TTFT 410 -> 270 ms), the KV
        # cache staying bf16.
        self._fp32_from_rows = _shared_threshold(layers, "fp32_min_rows") if self._bf16_from_rows is not None else None
        self.dense_twin: DenseTwin | None = None
        # A mixed-precision model rounds its adapters' weights to bf16 for small steps, like its linears'.
        mixed = self._bf16_from_rows is not None
        self._adapters = [
            None if layer.residual_adapter is None else ResidualAdapter(layer.residual_adapter, mixed)
            for layer in layers
        ]

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        """Where the weights live; inputs, the KV cache and the batch's index tensors must be there too."""
        return self.embed_tokens.device

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        batch: SlotBatch,
        key_caches: list[torch.Tensor],
        value_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        """Hidden states [T, d] after the final norm, for the flat batch of new tokens described by `batch`."""
        twin = self.dense_twin
        if twin is None:
            return self._forward_layers(input_ids, batch, key_caches, value_caches)
        num_tokens, threads, started = input_ids.shape[0], torch.get_num_threads(), time.perf_counter()
        timed = twin.timed(num_tokens)
        to_twin = not timed or twin.timings.prefers_twin(threads, num_tokens)
        if to_twin:
            hidden = twin.model.forward(input_ids, batch, key_caches, value_caches) @ twin.to_final_basis
        else:
            hidden = self._forward_layers(input_ids, batch, key_caches, value_caches)
        if timed:
            twin.timings.record(threads, num_tokens, to_twin, time.perf_counter() - started)
        return hidden

    def _forward_layers(
        self,
        input_ids: torch.Tensor,
        batch: SlotBatch,
        key_caches: list[torch.Tensor],
        value_caches: list[torch.Tensor],
    ) -> torch.Tensor:
        arch = self.arch
        compute_dtype = self.compute_dtype(input_ids.shape[0])
        hidden = F.embedding(input_ids, self.embed_tokens)
        cos, sin = self.rope.tables(batch.position_of_token)
        mlp_out: torch.Tensor | None = None  # the last MLP block's output, added where the next layer starts
        for layer, adapter, key_cache, value_cache in zip(
            self.layers, self._adapters, key_caches, value_caches, strict=True
        ):
            hidden, x = enter_layer(hidden, mlp_out, adapter, layer.input_norm, arch.rms_norm_eps, compute_dtype)
            qkv = layer.qkv_proj(x)
            q = rope_and_store_kv(qkv, cos, sin, key_cache, value_cache, batch, arch.num_heads, arch.num_kv_heads)
            attn = attend(q, key_cache, value_cache, batch, self.scale)
            # hidden += o_proj(attn) in place (a bf16 block output widens into the fp32 residual), then the norm
            x = add_rms_norm(hidden, layer.o_proj(attn), layer.post_attention_norm, arch.rms_norm_eps, compute_dtype)
            mlp_out = layer.down_proj(silu_mul(layer.gate_up_proj(x)))
        _, out = enter_layer(hidden, mlp_out, None, self.final_norm, arch.rms_norm_eps, hidden.dtype)
        return out

    def compute_dtype(self, num_tokens: int) -> torch.dtype:
        """The dtype a step of `num_tokens` tokens runs its blocks in."""
        if self._fp32_from_rows is not None and num_tokens >= self._fp32_from_rows:
            return self.dtype
        if self._bf16_from_rows is not None and num_tokens >= self._bf16_from_rows:
            return torch.bfloat16
        return self.dtype

    @torch.inference_mode()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 logits [S, vocab] for the rows of `hidden` that will be sampled."""
        return self.lm_head(hidden).float()


def enter_layer(
    hidden: torch.Tensor,
    mlp_out: torch.Tensor | None,
    adapter: ResidualAdapter | None,
    norm: torch.Tensor | None,
    eps: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual stream entering a layer (the previous MLP block's output added, then LaRoSA's change of basis
    where the layer has one) and its normalised input. The add rides on the next call (the norm's or the
    adapter's) instead of being a call of its own: at decode sizes a small op costs ~10 us of dispatch, the
    weight streams of the linears having evicted the dispatcher's code and data from L2. `hidden` (the model's own
    fp32 residual tensor) may be updated in place."""
    if adapter is not None:
        return adapter.enter(hidden, mlp_out, norm, eps, dtype)
    if mlp_out is None:
        return hidden, rms_norm(hidden, norm, eps, dtype)
    return hidden, add_rms_norm(hidden, mlp_out, norm, eps, dtype)


def _shared_threshold(layers: list[DecoderLayer], name: str) -> int | None:
    """The row count `name` (bf16_min_rows: from which a linear computes in bf16; fp32_min_rows: from which it
    computes in fp32 after all) common to every linear, or None where any linear has none (or they differ).

    LaRoSA's sparse layers report their dense path's thresholds, so a LaRoSA model computes like the dense one.
    """
    linears = [
        linear for layer in layers for linear in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)
    ]
    thresholds = {getattr(linear, name, None) for linear in linears}
    if len(thresholds) != 1:
        return None
    return thresholds.pop()
