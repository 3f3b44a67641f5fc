"""Build a LlamaModel from a local Hugging Face folder (*.safetensors + config.json); never from a hub.

Handles tied or untied embeddings, GQA, Qwen2's q/k/v biases and sharded checkpoints. A LaRoSA folder carries
extra tensors (`model.layers.N.residual_adapter`) and folded norms; `make_linear` lets the caller choose the
linear implementation per module (dense by default).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from fusedserve.engine.model.arch import LlamaArch
from fusedserve.engine.model.llama import DecoderLayer, LlamaModel
from fusedserve.kernels.linear import DenseLinear, Linear

# make_linear(module_name, weight, bias) -> Linear; module_name is e.g. "layers.3.qkv_proj" or "lm_head".
LinearFactory = Callable[[str, torch.Tensor, torch.Tensor | None], Linear]


def dense_linear_factory(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    """Dense layers computing in the weights' own dtype for every batch size (exact float32 when fp32)."""
    return DenseLinear(weight, bias, bf16_min_rows=None)


def mixed_precision_linear_factory(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    """Dense layers that keep fp32 weights for small batches and use a bf16 copy (AMX) for large ones."""
    return DenseLinear(weight, bias)


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                state[name] = handle.get_tensor(name)
    return state


def load_llama(
    model_dir: Path,
    dtype: torch.dtype = torch.float32,
    max_positions: int | None = None,
    make_linear: LinearFactory = dense_linear_factory,
    device: torch.device | str = "cpu",
) -> LlamaModel:
    """The model with every weight in `dtype` on `device` (read on the host, moved tensor by tensor)."""
    arch = LlamaArch.from_model_dir(model_dir)
    state = read_state_dict(model_dir)

    def take(name: str) -> torch.Tensor:
        return state.pop(name).to(device=device, dtype=dtype)

    def maybe(name: str) -> torch.Tensor | None:
        return take(name) if name in state else None

    layers = []
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        qkv_weight = torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        qkv_bias = None
        if arch.qkv_bias or (p + "self_attn.q_proj.bias") in state:
            qkv_bias = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
        gate_up = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        layers.append(
            DecoderLayer(
                input_norm=maybe(p + "input_layernorm.weight"),
                post_attention_norm=maybe(p + "post_attention_layernorm.weight"),
                qkv_proj=make_linear(f"layers.{i}.qkv_proj", qkv_weight, qkv_bias),
                o_proj=make_linear(f"layers.{i}.o_proj", take(p + "self_attn.o_proj.weight"), None),
                gate_up_proj=make_linear(f"layers.{i}.gate_up_proj", gate_up, None),
                down_proj=make_linear(f"layers.{i}.down_proj", take(p + "mlp.down_proj.weight"), None),
                residual_adapter=maybe(p + "residual_adapter"),
            )
        )
    embed = take("model.embed_tokens.weight")
    head_weight = maybe("lm_head.weight")
    if head_weight is None:
        if not arch.tie_word_embeddings:
            raise ValueError(f"{model_dir}: lm_head.weight missing and embeddings are not tied")
        head_weight = embed
    return LlamaModel(
        arch=arch,
        embed_tokens=embed,
        layers=layers,
        final_norm=maybe("model.norm.weight"),
        lm_head=make_linear("lm_head", head_weight, None),
        max_positions=max_positions or arch.max_position_embeddings,
    )
