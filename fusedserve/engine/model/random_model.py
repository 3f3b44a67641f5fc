"""Write a tiny random-weight Llama folder for tests and benchmarks that need a model but not its quality.

The folder is a normal Hugging Face folder (config.json, model.safetensors) and borrows the tokenizer files of a
real model folder when one is given, so chat templates and detokenization behave as in production.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


def write_random_llama(
    out: Path,
    vocab_size: int = 49152,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    max_position_embeddings: int = 2048,
    tie_word_embeddings: bool = False,
    tokenizer_from: Path | None = None,
    seed: int = 0,
) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    head_dim = hidden_size // num_heads

    def randn(*shape: int, scale: float = 0.3) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale

    state = {"model.embed_tokens.weight": randn(vocab_size, hidden_size, scale=0.5)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = 1.0 + randn(hidden_size, scale=0.1)
        state[p + "post_attention_layernorm.weight"] = 1.0 + randn(hidden_size, scale=0.1)
        state[p + "self_attn.q_proj.weight"] = randn(num_heads * head_dim, hidden_size)
        state[p + "self_attn.k_proj.weight"] = randn(num_kv_heads * head_dim, hidden_size)
        state[p + "self_attn.v_proj.weight"] = randn(num_kv_heads * head_dim, hidden_size)
        state[p + "self_attn.o_proj.weight"] = randn(hidden_size, num_heads * head_dim)
        state[p + "mlp.gate_proj.weight"] = randn(intermediate_size, hidden_size)
        state[p + "mlp.up_proj.weight"] = randn(intermediate_size, hidden_size)
        state[p + "mlp.down_proj.weight"] = randn(hidden_size, intermediate_size)
    state["model.norm.weight"] = 1.0 + randn(hidden_size, scale=0.1)
    if not tie_word_embeddings:
        state["lm_head.weight"] = randn(vocab_size, hidden_size, scale=0.5)
    save_file({k: v.contiguous() for k, v in state.items()}, out / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie_word_embeddings,
        "hidden_act": "silu",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_from) / name).exists():
                shutil.copy(Path(tokenizer_from) / name, out / name)
    return out
