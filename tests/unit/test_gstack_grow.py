"""G_stack growth on a tiny trained Llama folder: layer map, independence, config, manifest, HF loading."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fusedserve.engine.gstack.corpus import TokenStream, heldout_windows
from fusedserve.engine.gstack.grow import grow_folder, grow_model, stack_state_dict
from fusedserve.engine.gstack.manifest import read_manifest
from fusedserve.engine.gstack.model_folder import ModelShape, create_random_model, load_model
from fusedserve.engine.gstack.train import TrainConfig, train

torch.set_num_threads(1)

BASE_LAYERS, FACTOR = 2, 3
TOKENS = np.frombuffer(b"def add(a, b):\n    return a + b\n\n" * 200, dtype=np.uint8).astype(np.uint16)


@pytest.fixture(scope="module")
def trained_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gstack_base")
    init = create_random_model(root / "init", ModelShape(BASE_LAYERS, 32, 4, 64, 64), seed=0)
    config = TrainConfig(total_steps=4, batch_size=4, seq_len=32, warmup_steps=1, eval_every=4, log_every=2)
    stream = TokenStream(TOKENS, 32)
    train(init, root / "base", config, stream, heldout_windows(TOKENS, 32, 4), progress=False)
    return root / "base"


@pytest.fixture(scope="module")
def grown(trained_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gstack_grown") / "grown"
    grow_folder(trained_base, FACTOR, out)
    return out


def test_target_layer_r_times_l_plus_i_equals_base_layer_i(trained_base: Path, grown: Path) -> None:
    base, target = load_model(trained_base), load_model(grown)
    for r in range(FACTOR):
        for i in range(BASE_LAYERS):
            base_layer = base.model.layers[i].state_dict()
            target_layer = target.model.layers[r * BASE_LAYERS + i].state_dict()
            assert base_layer.keys() == target_layer.keys()
            for name, tensor in base_layer.items():
                assert torch.equal(tensor, target_layer[name]), (r, i, name)


def test_embeddings_final_norm_and_head_are_copied_once(trained_base: Path, grown: Path) -> None:
    base, target = load_model(trained_base), load_model(grown)
    assert torch.equal(base.model.embed_tokens.weight, target.model.embed_tokens.weight)
    assert torch.equal(base.model.norm.weight, target.model.norm.weight)
    assert torch.equal(base.lm_head.weight, target.lm_head.weight)


def test_grown_parameters_share_no_storage_with_each_other_or_the_base(trained_base: Path) -> None:
    base = load_model(trained_base)
    target = grow_model(base, FACTOR)
    target_ptrs = [p.untyped_storage().data_ptr() for p in target.parameters()]
    base_ptrs = {p.untyped_storage().data_ptr() for p in base.parameters()}
    assert len(set(target_ptrs)) == len(target_ptrs)
    assert not base_ptrs & set(target_ptrs)
    first = target.model.layers[0].mlp.up_proj.weight
    copy = target.model.layers[BASE_LAYERS].mlp.up_proj.weight
    with torch.no_grad():
        first.add_(1.0)
    assert not torch.equal(first, copy)
    assert not torch.equal(first, base.model.layers[0].mlp.up_proj.weight)


def test_grown_config_and_per_layer_indices_are_updated(grown: Path) -> None:
    target = load_model(grown)
    assert target.config.num_hidden_layers == FACTOR * BASE_LAYERS
    assert [layer.self_attn.layer_idx for layer in target.model.layers] == list(range(FACTOR * BASE_LAYERS))


def test_grown_manifest_records_provenance(trained_base: Path, grown: Path) -> None:
    provenance = read_manifest(grown)["gstack"]
    assert provenance == {
        "base": str(trained_base),
        "factor": FACTOR,
        "base_layers": BASE_LAYERS,
        "base_tokens": 4 * 4 * 32,
        "trained_tokens": 0,
    }
    assert "pretrain" not in read_manifest(grown)


def test_grown_folder_loads_with_auto_classes_and_generates(grown: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(grown))
    model = AutoModelForCausalLM.from_pretrained(str(grown))
    assert model.config.model_type == "llama"
    ids = tokenizer("def add", return_tensors="pt").input_ids
    assert ids[0].tolist() == list(b"def add")
    output = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert output.shape == (1, ids.shape[1] + 4)
    assert isinstance(tokenizer.decode(output[0]), str)


def test_stack_state_dict_rejects_a_zero_factor() -> None:
    with pytest.raises(ValueError):
        stack_state_dict({"model.layers.0.w": torch.zeros(1)}, 1, 0)
