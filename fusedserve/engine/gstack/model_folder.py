"""Create, load and save the HF Llama folders Gstack works on (config, safetensors, tokenizer, manifest).

A folder written here loads with `AutoModelForCausalLM` / `AutoTokenizer` and is served as is. This module
never trains and never changes weights; it only builds fresh random models and moves weights to and from disk.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusedserve.engine.gstack.byte_tokenizer import EOT_ID, VOCAB_SIZE, save_byte_tokenizer
from fusedserve.engine.gstack.manifest import write_manifest

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)


@dataclass(frozen=True)
class ModelShape:
    """The shape of a fresh byte-level Llama (untied embeddings, like the published Gstack models)."""

    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512


def llama_config(shape: ModelShape):  # -> transformers.LlamaConfig
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=EOT_ID,
        eos_token_id=EOT_ID,
        pad_token_id=EOT_ID,
        architectures=["LlamaForCausalLM"],
    )


def create_random_model(folder: Path, shape: ModelShape, seed: int) -> Path:
    """Write a freshly initialised byte-level Llama folder (manifest: 0 pre-training tokens)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(shape))
    save_model(model, folder, {"pretrain": {"trained_tokens": 0}})
    save_byte_tokenizer(folder)
    return folder


def load_model(folder: Path, dtype: Any = "auto"):  # -> transformers.LlamaForCausalLM
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(folder), dtype=dtype)


def save_model(model: Any, folder: Path, manifest: dict[str, Any]) -> None:
    """Weights + config as safetensors, then the manifest (tokenizer files are copied separately)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(str(folder), safe_serialization=True)
    write_manifest(folder, manifest)


def copy_tokenizer_files(source: Path, target: Path) -> None:
    for name in TOKENIZER_FILES:
        path = Path(source) / name
        if path.exists() and not (Path(target) / name).exists():
            shutil.copy2(path, Path(target) / name)


def count_parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())
