"""Fine-tuning a patched tiny Llama: only the chosen tensors move, and an interrupted run resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch
from adaptivocab_helpers import write_domain_corpus, write_tiny_model
from safetensors.torch import load_file

from fusedserve.engine.adaptivocab.build import BuildRequest, run_build
from fusedserve.engine.adaptivocab.finetune import FinetuneConfig, FinetuneRequest, lr_factor, run_finetune
from fusedserve.engine.adaptivocab.lm_data import pack_documents, sequence_indices_for_step
from fusedserve.engine.manifest import read_manifest

torch.set_num_threads(1)

CONFIG = FinetuneConfig(steps=4, seq_len=32, grad_accum=2, warmup=1, checkpoint_every=1, bf16=False)


@pytest.fixture(scope="module")
def adapted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("ft")
    model = write_tiny_model(root / "model")
    corpus = write_domain_corpus(root / "corpus", files=12)
    run_build(BuildRequest(model, str(corpus), root / "adapted", replace=40), show_progress=False)
    return {"root": root, "adapted": root / "adapted"}


def test_finetune_trains_embeddings_head_first_and_last_layer_only(adapted: dict) -> None:
    root = adapted["root"]
    request = FinetuneRequest(adapted["adapted"], None, root / "tuned", root / "ckpt-a", CONFIG)
    record = run_finetune(request, show_progress=False)
    assert record["steps_done"] == 4 and record["tokens_seen"] == 4 * 2 * 32
    before = load_file(str(adapted["adapted"] / "model.safetensors"))
    after = load_file(str(root / "tuned" / "model.safetensors"))
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert "model.embed_tokens.weight" in changed and "lm_head.weight" in changed
    assert any(n.startswith("model.layers.0.") for n in changed)
    assert any(n.startswith("model.layers.2.") for n in changed)
    assert not any(n.startswith("model.layers.1.") for n in changed)
    assert "model.norm.weight" not in changed
    entry = read_manifest(root / "tuned")["adaptivocab"]
    assert entry["finetuned"] is True and entry["finetune"]["steps_done"] == 4
    assert (root / "tuned" / "adaptivocab_patch.json").exists()


def test_interrupted_finetune_resumes_to_the_same_weights(adapted: dict) -> None:
    root = adapted["root"]
    straight = FinetuneRequest(adapted["adapted"], None, root / "straight", root / "ckpt-s", CONFIG)
    run_finetune(straight, show_progress=False)
    first = FinetuneRequest(adapted["adapted"], None, root / "resumed", root / "ckpt-r", CONFIG, 2)
    partial = run_finetune(first, show_progress=False)
    assert partial["steps_done"] == 2 and not (root / "resumed").exists()
    second = FinetuneRequest(adapted["adapted"], None, root / "resumed", root / "ckpt-r", CONFIG)
    resumed = run_finetune(second, show_progress=False)
    assert resumed["steps_done"] == 4
    a = load_file(str(root / "straight" / "model.safetensors"))
    b = load_file(str(root / "resumed" / "model.safetensors"))
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name


def test_resume_with_other_data_settings_is_refused(adapted: dict) -> None:
    root = adapted["root"]
    other = FinetuneConfig(steps=4, seq_len=16, grad_accum=2, warmup=1, checkpoint_every=1, bf16=False)
    run_finetune(
        FinetuneRequest(adapted["adapted"], None, root / "o", root / "ckpt-o", CONFIG, max_new_steps=1),
        show_progress=False,
    )
    with pytest.raises(ValueError, match="was written by a run"):
        run_finetune(FinetuneRequest(adapted["adapted"], None, root / "o", root / "ckpt-o", other))


def test_learning_rate_warms_up_then_follows_a_cosine_to_the_floor() -> None:
    config = FinetuneConfig(steps=100, warmup=10, min_lr_ratio=0.1)
    assert lr_factor(0, config) == pytest.approx(0.1) and lr_factor(9, config) == pytest.approx(1.0)
    assert lr_factor(10, config) == pytest.approx(1.0)
    assert lr_factor(55, config) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, config) == pytest.approx(0.1)


def test_packed_sequences_and_step_batches_are_deterministic() -> None:
    data = pack_documents([[5, 6, 7], [8, 9]], separator_id=0, seq_len=3)
    assert data.tokens.tolist() == [[5, 6, 7], [0, 8, 9]]
    assert sequence_indices_for_step(10, 3, 4, seed=1) == sequence_indices_for_step(10, 3, 4, seed=1)
    epoch = [i for step in range(5) for i in sequence_indices_for_step(10, step, 2, seed=1)]
    assert sorted(epoch) == list(range(10))


def test_next_token_loss_matches_transformers_loss(adapted: dict) -> None:
    from transformers import LlamaForCausalLM

    from fusedserve.engine.adaptivocab.finetune import next_token_loss

    model = LlamaForCausalLM.from_pretrained(str(adapted["adapted"]), dtype=torch.float32)
    batch = torch.randint(0, model.config.vocab_size, (2, 24))
    ours = next_token_loss(model, batch, bf16=False)
    theirs = model(input_ids=batch, labels=batch).loss
    assert math.isclose(ours.item(), theirs.item(), rel_tol=1e-5)
    grads = torch.autograd.grad(ours, model.lm_head.weight)[0]
    reference = torch.autograd.grad(model(input_ids=batch, labels=batch).loss, model.lm_head.weight)[0]
    torch.testing.assert_close(grads, reference, rtol=1e-4, atol=1e-7)
