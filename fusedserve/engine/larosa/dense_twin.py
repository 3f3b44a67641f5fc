"""LaRoSA's dense twin: the same network with one residual basis for all layers, for the steps that run dense.

A LaRoSA model keeps layer l's residual stream in its own basis Q_l, so each layer l >= 1 starts with a d x d
residual adapter A_l = Q_{l-1}^T Q_l. Only the sparse path needs those bases (top-k picks channels of the rotated
activations). A step that every sparse layer computes densely (large decode batches, prefill) would pay for the
adapters for nothing: about 3 ms a step at 16 tokens on SmolLM2, which made LaRoSA slower than dense there.
So does a step where only a few small layers could go sparse (8 tokens at 50%): their best case saves less than
the adapters cost.

The twin keeps the whole residual stream in basis Q_0. With P_l = Q_0^T Q_l = A_1 ... A_l, computed from the
folder's own adapters (no rotations or calibration data needed), layer l's input-side weights (q/k/v, gate/up)
become W P_l^T and its output-side weights (o, down) P_l W; the embedding is shared, and the final hidden states
map into the LM head's basis through P_{L-1}. So the twin computes what the LaRoSA model's dense paths compute,
to rounding, and writes the same keys and values: the two alternate step by step on one KV cache.
This module never decides sparsity levels and never runs a step.
"""

from __future__ import annotations

import sys

import torch

from fusedserve.engine.model.llama import DecoderLayer, DenseTwin, LlamaModel
from fusedserve.engine.model.loader import LinearFactory
from fusedserve.kernels.linear import Linear
from fusedserve.kernels.sparse_linear import MAX_UNION_FRACTION_CPP, SPARSE_MAX_ROWS, TopKSparseLinear


def attach_dense_twin(model: LlamaModel, make_dense: LinearFactory) -> bool:
    """Give a LaRoSA `model` a dense twin for the steps its sparse layers cannot speed up (see first_twin_step).

    `make_dense` builds the twin's linears (the engine's dense policy, e.g. mixed precision). Returns False, and
    leaves the model as it is, where a twin cannot help or would be wrong: no residual adapters (an unrotated top-k
    model's dense path is already the plain model), sparse paths that pay at every batch size, masked dense paths,
    or unfolded norm scales.
    """
    if all(layer.residual_adapter is None for layer in model.layers):
        return False
    norm_scales = [model.final_norm] + [
        n for layer in model.layers for n in (layer.input_norm, layer.post_attention_norm)
    ]
    if any(scale is not None for scale in norm_scales):
        return False  # a scale lives in its layer's basis; absorb.py folds them all into the linears
    steps = {threads: first_twin_step(model, threads) for threads in MAX_UNION_FRACTION_CPP}
    if all(step is None for step in steps.values()):
        return False
    from_tokens = {threads: sys.maxsize if step is None else step for threads, step in steps.items()}
    bases = residual_bases(model)
    twin_layers = [
        _twin_layer(i, layer, basis, make_dense)
        for i, (layer, basis) in enumerate(zip(model.layers, bases, strict=True))
    ]
    twin = LlamaModel(
        arch=model.arch,
        embed_tokens=model.embed_tokens,  # already in basis Q_0
        layers=twin_layers,
        final_norm=None,
        lm_head=model.lm_head,  # unused: the twin's hidden states go back through this model's head
        max_positions=model.rope.cos.shape[0],
    )
    model.dense_twin = DenseTwin(twin, from_tokens, bases[-1].to(model.dtype))
    return True


def first_twin_step(model: LlamaModel, threads: int) -> int | None:
    """The fewest tokens from which the twin should compute every step of `model` at `threads` torch threads
    (None: never).

    A step belongs to the twin when the sparse layers could not skip, even at best (each eligible layer reading
    only its k rows), as many weights as the residual adapters read (at 50% on SmolLM2 the adapters are 9% of the
    sparse layers' weights). A layer is eligible at a row count where its expected union of kept channels is
    within the break-even measured at that thread count (kernels/sparse_linear.MAX_UNION_FRACTION_CPP).
    """
    sparse = [linear for layer in model.layers for linear in _linears(layer) if isinstance(linear, TopKSparseLinear)]
    if any(linear.mask_dense_path for linear in sparse):
        return None  # masked dense paths (quality evaluation) compute what the unmasked twin cannot
    adapter_weights = sum(
        layer.residual_adapter.numel() for layer in model.layers if layer.residual_adapter is not None
    )

    def sparse_pays(rows: int) -> bool:
        eligible = [linear for linear in sparse if linear.may_take_sparse_path(rows, threads)]
        return sum((linear.in_features - linear.k) * linear.out_features for linear in eligible) >= adapter_weights

    beyond_limit = SPARSE_MAX_ROWS + 1
    if sparse_pays(beyond_limit):
        return None
    return max((rows for rows in range(1, beyond_limit) if sparse_pays(rows)), default=0) + 1


def residual_bases(model: LlamaModel) -> list[torch.Tensor]:
    """P_l = A_1 ... A_l (P_0 = I) in float64: layer l's residual basis seen from basis Q_0."""
    d = model.arch.hidden_size
    basis = torch.eye(d, dtype=torch.float64, device=model.device)
    bases = []
    for layer in model.layers:
        if layer.residual_adapter is not None:
            basis = basis @ layer.residual_adapter.double()
        bases.append(basis)
    return bases


def _linears(layer: DecoderLayer) -> tuple[Linear, ...]:
    return (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj)


def _dense_weight(linear: Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The [out, in] weight and bias a layer computes with on its dense path."""
    dense = linear.dense if isinstance(linear, TopKSparseLinear) else linear
    return dense.weight, dense.bias


def _twin_layer(index: int, layer: DecoderLayer, basis: torch.Tensor, make_dense: LinearFactory) -> DecoderLayer:
    def input_side(name: str, linear: Linear) -> Linear:
        weight, bias = _dense_weight(linear)
        return make_dense(f"layers.{index}.{name}", (weight.double() @ basis.T).to(weight.dtype), bias)

    def output_side(name: str, linear: Linear) -> Linear:
        weight, bias = _dense_weight(linear)
        return make_dense(f"layers.{index}.{name}", (basis @ weight.double()).to(weight.dtype), bias)

    return DecoderLayer(
        input_norm=layer.input_norm,
        post_attention_norm=layer.post_attention_norm,
        qkv_proj=input_side("qkv_proj", layer.qkv_proj),
        o_proj=output_side("o_proj", layer.o_proj),
        gate_up_proj=input_side("gate_up_proj", layer.gate_up_proj),
        down_proj=output_side("down_proj", layer.down_proj),
    )
