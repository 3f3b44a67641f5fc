"""The G_stack growth operator (Du et al., 2024): stack a trained L-layer Llama G times into a G*L-layer one.

Target layer r*L + i is an independent copy (cloned tensors) of base layer i; embeddings, final norm and LM
head are copied once; width is unchanged; no noise, no rescaling. The target is built as a fresh
LlamaForCausalLM so every per-layer index (self_attn.layer_idx, used by the KV cache) is right.
This module never trains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from fusedserve.engine.gstack.manifest import (
    GstackProvenance,
    manifest_for_growth,
    read_manifest,
    tokens_seen,
)
from fusedserve.engine.gstack.model_folder import copy_tokenizer_files, load_model, save_model

LAYER_KEY = re.compile(r"^(model\.layers\.)(\d+)(\..+)$")


@dataclass(frozen=True)
class GrowResult:
    out: Path
    base_layers: int
    target_layers: int
    provenance: GstackProvenance


def stack_state_dict(
    base_state: dict[str, torch.Tensor], base_layers: int, factor: int
) -> dict[str, torch.Tensor]:
    """G_stack on a state dict: target layer r*L + i <- clone of base layer i, the rest cloned once."""
    if factor < 1:
        raise ValueError(f"growth factor must be >= 1, got {factor}")
    target: dict[str, torch.Tensor] = {}
    for key, tensor in base_state.items():
        match = LAYER_KEY.match(key)
        if match is None:
            target[key] = tensor.detach().clone()
            continue
        prefix, index, suffix = match.group(1), int(match.group(2)), match.group(3)
        if index >= base_layers:
            raise ValueError(f"state dict has layer {index} but the config says {base_layers} layers")
        for copy in range(factor):
            target[f"{prefix}{copy * base_layers + index}{suffix}"] = tensor.detach().clone()
    return target


def grown_config(base_config, factor: int):  # -> transformers.LlamaConfig
    """The base config with G*L layers (and any per-layer lists tiled the same way)."""
    config = base_config.__class__.from_dict(base_config.to_dict())
    base_layers = base_config.num_hidden_layers
    config.num_hidden_layers = base_layers * factor
    layer_types = getattr(base_config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == base_layers:
        config.layer_types = list(layer_types) * factor
    return config


def grow_model(base_model, factor: int):  # -> transformers.LlamaForCausalLM
    """A new, independent G*L-layer model holding the stacked weights of `base_model`."""
    from transformers import LlamaForCausalLM

    config = grown_config(base_model.config, factor)
    target = LlamaForCausalLM(config).to(dtype=next(base_model.parameters()).dtype)
    state = stack_state_dict(base_model.state_dict(), base_model.config.num_hidden_layers, factor)
    target.load_state_dict(state, strict=True)
    target.eval()
    return target


def grow_folder(base: Path, factor: int, out: Path) -> GrowResult:
    """Read a Llama folder, write its G_stack-grown copy (weights, config, tokenizer, manifest) to `out`."""
    base, out = Path(base), Path(out)
    base_model = load_model(base)
    base_layers = base_model.config.num_hidden_layers
    target = grow_model(base_model, factor)
    base_manifest = read_manifest(base)
    provenance = GstackProvenance(
        base=str(base),
        factor=factor,
        base_layers=base_layers,
        base_tokens=tokens_seen(base_manifest),
        trained_tokens=0,
    )
    save_model(target, out, manifest_for_growth(base_manifest, provenance))
    copy_tokenizer_files(base, out)
    return GrowResult(
        out=out, base_layers=base_layers, target_layers=base_layers * factor, provenance=provenance
    )
