"""Quality and workload inputs of the fused benchmark: held-out domain text, and bits per byte as served.

Bits per byte are computed with the engine's own model and tokenizer loaders, so the number describes what a
preset serves: AdaptiVocab's PatchTokenizer and untied embeddings, and LaRoSA's top-k sparse linears. The server
runs LaRoSA's top-k only where it pays (decode steps of few tokens; prefill and large batches compute the exact
dense product), so scoring teacher-forced text as served would measure the dense model. Here every token is
top-k sparsified instead, as each would be when decoded alone: the quality of the sparse decode path, a bound
on what any served token can lose. Benchmarks only: never imported by the package.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fusedserve.engine.adaptivocab.corpus import load_split
from fusedserve.engine.adaptivocab.evaluation import bits_per_byte, sample_chunks
from fusedserve.engine.kv_cache import KVCacheSpec, StaticKVCache
from fusedserve.engine.larosa.runtime import larosa_plan, sparse_linear_factory
from fusedserve.engine.llm_engine import load_model_for_engine
from fusedserve.engine.model.default_model import ensure_default_model
from fusedserve.engine.model.llama import LlamaModel
from fusedserve.engine.model.loader import dense_linear_factory, load_llama
from fusedserve.engine.tokenizer import load_tokenizer
from fusedserve.kernels.attention import SlotBatch

MAX_CHUNK_CHARS = 2000
PROMPT_CHARS = 400


@dataclass
class _Logits:
    logits: torch.Tensor


class EngineLM:
    """Our inference model behind the `model(input_ids=...).logits` call that the bpb scorer expects."""

    def __init__(self, model: LlamaModel, max_len: int = 2048) -> None:
        arch = model.arch
        self.model = model
        spec = KVCacheSpec(arch.num_layers, 1, max_len, arch.num_kv_heads, arch.head_dim, model.dtype)
        self.cache = StaticKVCache(spec)
        self.cache.allocate_slot()

    def eval(self) -> EngineLM:
        return self

    def __call__(self, input_ids: torch.Tensor) -> _Logits:
        ids = input_ids[0]
        assert self.cache.reserve_tokens(0, len(ids))
        batch = SlotBatch.build([0], [len(ids)], [len(ids)])
        hidden = self.model.forward(ids, batch, self.cache.key_cache, self.cache.value_cache)
        return _Logits(self.model.compute_logits(hidden).unsqueeze(0))


def heldout_prompts(count: int) -> list[str]:
    """Prompts cut from held-out Python documentation (never seen by AdaptiVocab's fine-tuning)."""
    chunks = sample_chunks(load_split(None).heldout, byte_budget=count * 4 * PROMPT_CHARS, max_chars=MAX_CHUNK_CHARS)
    prompts = [" ".join(c.split())[:PROMPT_CHARS] for c in chunks if len(c) >= PROMPT_CHARS]
    return [prompts[i % len(prompts)] for i in range(count)]


def scored_model(folder: Path, max_positions: int = 2048) -> tuple[LlamaModel, float]:
    """The preset's model in float32 and its LaRoSA target sparsity (0.0 for a dense model); a LaRoSA model
    sparsifies every token (see the module docstring) and gets no dense twin."""
    plan = larosa_plan(folder)
    if plan is None:
        return load_model_for_engine(folder, "float32", max_positions=max_positions), 0.0
    factory = sparse_linear_factory(plan, dense_linear_factory, mask_dense_path=True)
    return load_llama(folder, torch.float32, max_positions, make_linear=factory), plan.target


def domain_bits_per_byte(model_dir: Path | None, byte_budget: int) -> dict:
    folder = Path(model_dir) if model_dir else ensure_default_model()
    tokenizer = load_tokenizer(folder)
    model, sparsity = scored_model(folder)
    chunks = sample_chunks(load_split(None).heldout, byte_budget=byte_budget, max_chars=MAX_CHUNK_CHARS)
    prefix_id = 0  # <|endoftext|>: special ids keep their place in every preset's vocabulary
    assert tokenizer.decode([prefix_id], skip_special_tokens=False) == "<|endoftext|>"
    score = bits_per_byte(EngineLM(model), tokenizer.encode, chunks, prefix_id)
    return {
        "bits_per_byte": score.bits_per_byte,
        "tokens": score.total_tokens,
        "bytes": score.total_bytes,
        "chars": sum(len(c) for c in chunks),
        "chunks": score.chunks,
        "sparsity": sparsity,
        "sparsified_tokens": "every token" if sparsity else "none",
    }
