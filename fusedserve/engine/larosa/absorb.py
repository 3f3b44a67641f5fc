"""Absorb LaRoSA's per-layer rotations into a Llama checkpoint (the paper's merged design, its Figure 2).

Given orthogonal Q_l (one per layer), rewrite the Hugging Face state dict ([out, in] weights) so that inside
layer l the residual stream lives in basis Q_l, with every RMSNorm scale folded into the linears that follow:
  E' = E Q_0;  before layer l >= 1: h <- h A_l with A_l = Q_{l-1}^T Q_l (stored as model.layers.l.residual_adapter)
  W_{q,k,v}' = W diag(g_attn) Q_l;  W_{gate,up}' = W diag(g_mlp) Q_l;  W_o' = Q_l^T W_o;  W_down' = Q_l^T W_down
  W_head' = W_head diag(g_final) Q_{L-1}   (a tied head is untied first)
RMSNorm without a scale commutes with an orthogonal Q (||x Q|| = ||x||), so the dense rotated model computes the
same logits; the norm weights are dropped (the loader reads a missing norm weight as "no scale").
The attention output (o_proj's input) is outside the residual stream, so Q_l cannot reach it; but attention is
linear in V, so a per-KV-head orthogonal R_g rotates it exactly (absorb_value_rotations): W_v rows of KV head g
become R_g^T W_v[g], o_proj's columns of every query head h reading g become W_o[:, h] R_g, and head h's output
arrives as R_g^T o_h, in the principal basis of the attention outputs that top-k then sparsifies.
All arithmetic runs in float64. This module never runs a model and never writes files.
"""

from __future__ import annotations

import torch

from fusedserve.engine.model.arch import LlamaArch

ATTN_INPUTS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
MLP_INPUTS = ("mlp.gate_proj", "mlp.up_proj")


def adapter_name(layer: int) -> str:
    return f"model.layers.{layer}.residual_adapter"


def _scale(state: dict[str, torch.Tensor], name: str, size: int) -> torch.Tensor:
    weight = state.get(name)
    return torch.ones(size, dtype=torch.float64) if weight is None else weight.double()


def absorb_rotations(
    state: dict[str, torch.Tensor],
    arch: LlamaArch,
    rotations: list[torch.Tensor],
    dtype: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """The rotated, norm-folded, untied state dict (cast to `dtype`, default: the embedding's dtype).

    Tensors this function does not know (none in a plain Llama checkpoint) are copied unchanged.
    """
    if len(rotations) != arch.num_layers:
        raise ValueError(f"need one rotation per layer: {len(rotations)} for {arch.num_layers} layers")
    d = arch.hidden_size
    for i, q in enumerate(rotations):
        if q.shape != (d, d):
            raise ValueError(f"rotation {i} has shape {tuple(q.shape)}, expected ({d}, {d})")
    remaining = dict(state)
    embed = remaining.pop("model.embed_tokens.weight")
    out_dtype = dtype or embed.dtype
    head = remaining.pop("lm_head.weight", embed)  # tied: the head is the embedding, untied here
    final_scale = _scale(remaining, "model.norm.weight", d)
    remaining.pop("model.norm.weight", None)
    qs = [q.double() for q in rotations]
    rotated: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": embed.double() @ qs[0],
        "lm_head.weight": (head.double() * final_scale) @ qs[-1],
    }
    for layer, q in enumerate(qs):
        p = f"model.layers.{layer}."
        attn_scale = _scale(remaining, p + "input_layernorm.weight", d)
        mlp_scale = _scale(remaining, p + "post_attention_layernorm.weight", d)
        remaining.pop(p + "input_layernorm.weight", None)
        remaining.pop(p + "post_attention_layernorm.weight", None)
        for name in ATTN_INPUTS:
            rotated[p + name + ".weight"] = (remaining.pop(p + name + ".weight").double() * attn_scale) @ q
        for name in MLP_INPUTS:
            rotated[p + name + ".weight"] = (remaining.pop(p + name + ".weight").double() * mlp_scale) @ q
        rotated[p + "self_attn.o_proj.weight"] = q.T @ remaining.pop(p + "self_attn.o_proj.weight").double()
        rotated[p + "mlp.down_proj.weight"] = q.T @ remaining.pop(p + "mlp.down_proj.weight").double()
        if layer > 0:
            rotated[adapter_name(layer)] = qs[layer - 1].T @ q
    result = {name: tensor.to(out_dtype).contiguous() for name, tensor in rotated.items()}
    result.update(remaining)  # q/k/v biases and anything unknown: input rotations leave them unchanged
    return result


def rotations_from_covariances(covariances: list[torch.Tensor], damping: float = 0.01) -> list[torch.Tensor]:
    """Q_l = eigenvectors (columns, largest eigenvalue first) of H_l + damping * mean(diag H_l) * I, float64."""
    rotations = []
    for h in covariances:
        h = h.double()
        h = (h + h.T) / 2 + damping * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
        _, vectors = torch.linalg.eigh(h)
        rotations.append(vectors.flip(-1).contiguous())
    return rotations


def absorb_value_rotations(
    state: dict[str, torch.Tensor], arch: LlamaArch, rotations: list[list[torch.Tensor]]
) -> dict[str, torch.Tensor]:
    """A copy of `state` (original basis, before absorb_rotations) with rotations[l][g] ([head_dim, head_dim],
    orthogonal) put into layer l's V rows of KV head g and into o_proj's columns of the query heads that read g.

    Query head h reads KV head h // (num_heads / num_kv_heads), as in Hugging Face's repeat_kv. Tensors keep
    their dtype; the products run in float64."""
    hd, per_group = arch.head_dim, arch.num_heads // arch.num_kv_heads
    if len(rotations) != arch.num_layers or any(len(r) != arch.num_kv_heads for r in rotations):
        raise ValueError(f"need {arch.num_kv_heads} value rotations for each of {arch.num_layers} layers")
    result = dict(state)
    for layer, per_head in enumerate(rotations):
        p = f"model.layers.{layer}.self_attn."
        names = [p + "v_proj.weight", p + "o_proj.weight"] + ([p + "v_proj.bias"] if p + "v_proj.bias" in state else [])
        v, o, *bias = (state[name].double().clone() for name in names)
        for group, r in enumerate(per_head):
            r = r.double()
            if r.shape != (hd, hd):
                raise ValueError(f"value rotation {layer}/{group} has shape {tuple(r.shape)}, expected ({hd}, {hd})")
            rows = slice(group * hd, (group + 1) * hd)
            v[rows] = r.T @ v[rows]
            for b in bias:
                b[rows] = r.T @ b[rows]
            for head in range(group * per_group, (group + 1) * per_group):
                columns = slice(head * hd, (head + 1) * hd)
                o[:, columns] = o[:, columns] @ r
        for name, tensor in zip(names, [v, o, *bias], strict=True):
            result[name] = tensor.to(state[name].dtype).contiguous()
    return result
