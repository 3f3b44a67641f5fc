"""The architecture of a Llama-family checkpoint, read from its config.json (Llama, Mistral, Qwen2 layouts)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = {"llama", "mistral", "qwen2"}


@dataclass(frozen=True)
class LlamaArch:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    rope_scaling: dict[str, Any] | None

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> LlamaArch:
        model_type = config.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not a Llama-family model ({sorted(SUPPORTED_MODEL_TYPES)})")
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        rope_scaling = config.get("rope_scaling")
        rope_theta = config.get("rope_theta")
        if rope_theta is None and isinstance(config.get("rope_parameters"), dict):
            rope_theta = config["rope_parameters"].get("rope_theta")
        if rope_scaling is None and isinstance(config.get("rope_parameters"), dict):
            params = config["rope_parameters"]
            if params.get("rope_type", "default") != "default":
                rope_scaling = params
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
            rope_scaling=rope_scaling,
        )

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> LlamaArch:
        return cls.from_config(json.loads((Path(model_dir) / "config.json").read_text()))
