"""LaRoSA offline half: rotations absorbed into a model keep its logits; calibration writes a loadable folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fusedserve.engine.larosa.absorb import absorb_rotations, absorb_value_rotations, rotations_from_covariances
from fusedserve.engine.larosa.calibrate import (
    CalibrationConfig,
    build_larosa_model,
    collect_covariances,
    fp32_dense_factory,
    run_window,
)
from fusedserve.engine.larosa.dense_twin import attach_dense_twin
from fusedserve.engine.larosa.runtime import larosa_linear_factory, larosa_plan, sparse_linear_factory
from fusedserve.engine.larosa.sensitivity import (
    SENSITIVITY_FILE,
    LayerReplay,
    SensitivityTable,
    measure_sensitivity,
    probe_factory,
)
from fusedserve.engine.larosa.sparsity import SPARSE_MODULES, module_shapes
from fusedserve.engine.llm_engine import load_model_for_engine
from fusedserve.engine.manifest import read_manifest, update_manifest
from fusedserve.engine.model.arch import LlamaArch
from fusedserve.engine.model.llama import LlamaModel
from fusedserve.engine.model.loader import dense_linear_factory, load_llama, read_state_dict
from fusedserve.kernels.attention import SlotBatch
from fusedserve.kernels.linear import BF16_MIN_ROWS
from fusedserve.kernels.norm_rope import rms_norm
from fusedserve.kernels.sparse_linear import SPARSE_MAX_ROWS, TopKSparseLinear

torch.set_num_threads(1)


def write_tiny_llama(out: Path, dtype: torch.dtype = torch.float64, seed: int = 0) -> Path:
    """A 3-layer random Llama (GQA, tied embeddings, non-unit norm scales) as a Hugging Face folder."""
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    d, ffn, heads, kv_heads, head_dim, vocab = 64, 128, 4, 2, 16, 97

    def randn(*shape: int, scale: float = 0.1) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    state = {"model.embed_tokens.weight": randn(vocab, d, scale=1.0), "model.norm.weight": 1 + randn(d)}
    for i in range(3):
        p = f"model.layers.{i}."
        state[p + "input_layernorm.weight"] = 1 + randn(d, scale=0.3)
        state[p + "post_attention_layernorm.weight"] = 1 + randn(d, scale=0.3)
        state[p + "self_attn.q_proj.weight"] = randn(heads * head_dim, d)
        state[p + "self_attn.k_proj.weight"] = randn(kv_heads * head_dim, d)
        state[p + "self_attn.v_proj.weight"] = randn(kv_heads * head_dim, d)
        state[p + "self_attn.o_proj.weight"] = randn(d, heads * head_dim)
        state[p + "mlp.gate_proj.weight"] = randn(ffn, d)
        state[p + "mlp.up_proj.weight"] = randn(ffn, d)
        state[p + "mlp.down_proj.weight"] = randn(d, ffn)
    save_file(state, str(out / "model.safetensors"))
    config = {
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": d,
        "intermediate_size": ffn,
        "num_hidden_layers": 3,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "eos_token_id": 2,
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


def logits_of(model: LlamaModel, ids: torch.Tensor) -> torch.Tensor:
    arch, n = model.arch, ids.shape[0]
    keys = [torch.zeros(1, n, arch.num_kv_heads, arch.head_dim, dtype=model.dtype) for _ in model.layers]
    values = [torch.zeros_like(k) for k in keys]
    hidden = model.forward(ids, SlotBatch.build([0], [n], [n]), keys, values)
    return model.lm_head(hidden)


def random_rotations(num: int, d: int, seed: int = 1) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0] for _ in range(num)]


def save_rotated(
    source: Path, out: Path, rotations: list[torch.Tensor], dtype: torch.dtype, state: dict | None = None
) -> Path:
    """The source folder (or `state`, a changed copy of its weights) with `rotations` absorbed, saved to out."""
    arch = LlamaArch.from_model_dir(source)
    state = absorb_rotations(state or read_state_dict(source), arch, rotations, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"))
    config = json.loads((source / "config.json").read_text()) | {"tie_word_embeddings": False}
    (out / "config.json").write_text(json.dumps(config))
    return out


def test_rotated_tiny_llama_reproduces_logits_in_float64(tmp_path: Path) -> None:
    source = write_tiny_llama(tmp_path / "dense")
    rotated = save_rotated(source, tmp_path / "rotated", random_rotations(3, 64), torch.float64)
    ids = torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(2))
    expected = logits_of(load_llama(source, torch.float64), ids)
    got = logits_of(load_llama(rotated, torch.float64), ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_rotated_model_has_folded_norms_untied_head_and_adapters(tmp_path: Path) -> None:
    source = write_tiny_llama(tmp_path / "dense")
    model = load_llama(save_rotated(source, tmp_path / "rotated", random_rotations(3, 64), torch.float64))
    assert model.final_norm is None
    assert all(layer.input_norm is None and layer.post_attention_norm is None for layer in model.layers)
    assert model.layers[0].residual_adapter is None
    assert all(layer.residual_adapter is not None for layer in model.layers[1:])
    assert not torch.equal(model.lm_head.weight, model.embed_tokens)


def test_value_rotations_with_residual_rotations_reproduce_logits_in_float64(tmp_path: Path) -> None:
    source = write_tiny_llama(tmp_path / "dense")
    arch = LlamaArch.from_model_dir(source)
    per_head = random_rotations(3 * arch.num_kv_heads, arch.head_dim, seed=5)
    value_rotations = [per_head[i : i + arch.num_kv_heads] for i in range(0, len(per_head), arch.num_kv_heads)]
    original = read_state_dict(source)
    state = absorb_value_rotations(original, arch, value_rotations)
    name = "model.layers.0.self_attn.v_proj.weight"
    assert (state[name] - original[name]).abs().max() > 1e-3, "the rotations really changed V"
    rotated = save_rotated(source, tmp_path / "rotated", random_rotations(3, 64), torch.float64, state)
    ids = torch.randint(0, 97, (24,), generator=torch.Generator().manual_seed(2))
    expected = logits_of(load_llama(source, torch.float64), ids)
    torch.testing.assert_close(logits_of(load_llama(rotated, torch.float64), ids), expected, rtol=0, atol=1e-10)


def test_calibration_records_attention_outputs_per_kv_head(tmp_path: Path) -> None:
    source = write_tiny_llama(tmp_path / "dense", dtype=torch.float32)
    arch = LlamaArch.from_model_dir(source)
    windows = list(torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3)))
    (first, *_) = collect_covariances(source, windows, progress=False)
    assert first.attention_input.shape == first.mlp_input.shape == (64, 64)
    assert first.attention_output.shape == (arch.num_kv_heads, arch.head_dim, arch.head_dim)
    # scale-free inputs: every row has squared norm d, so the trace counts tokens times d
    assert first.attention_input.trace().item() == pytest.approx(32 * 64, rel=1e-4)
    assert first.mlp_input.trace().item() == pytest.approx(32 * 64, rel=1e-4)
    assert not torch.allclose(first.attention_output[0], first.attention_output[1])


def test_calibrated_rotations_are_orthogonal_eigenbases() -> None:
    x = torch.randn(500, 16, dtype=torch.float64) * torch.linspace(0.1, 3.0, 16, dtype=torch.float64)
    (q,) = rotations_from_covariances([x.T @ x], damping=0.01)
    torch.testing.assert_close(q.T @ q, torch.eye(16, dtype=torch.float64), rtol=0, atol=1e-12)
    variances = ((x @ q) ** 2).sum(0)
    assert torch.all(variances[:-1] >= variances[1:]), "principal directions come first"


def test_calibrate_writes_folder_manifest_and_sparse_factory(tmp_path: Path) -> None:
    source = write_tiny_llama(tmp_path / "dense", dtype=torch.float32)
    windows = list(torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(3)))
    config = CalibrationConfig(sparsity=0.4, allocation="fixed-ratio")
    out = build_larosa_model(source, tmp_path / "larosa", config, windows, "random", progress=False)
    entry = read_manifest(out)["larosa"]
    assert entry["sparsity"] == 0.4 and entry["transformers_loadable"] is False
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    ids = windows[0]
    expected = logits_of(load_llama(source), ids)
    torch.testing.assert_close(logits_of(load_llama(out), ids), expected, rtol=0, atol=2e-4)
    factory = larosa_linear_factory(out)
    assert factory is not None and larosa_linear_factory(source) is None
    sparse = load_llama(out, make_linear=factory)
    assert isinstance(sparse.layers[0].qkv_proj, TopKSparseLinear)
    assert sparse.layers[0].qkv_proj.k == 64 - round(entry["plan"]["module_sparsity"]["qkv_proj"] * 64)
    assert not isinstance(sparse.lm_head, TopKSparseLinear)
    run_window(sparse, ids)  # the sparse model runs end to end


def test_greedy_calibration_writes_per_layer_plan_at_the_target_and_serves_it(tmp_path: Path) -> None:
    source = write_tiny_llama(tmp_path / "dense", dtype=torch.float32)
    windows = list(torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(3)))
    out = build_larosa_model(
        source, tmp_path / "larosa", CalibrationConfig(sparsity=0.4), windows, "random", progress=False
    )
    entry = read_manifest(out)["larosa"]
    assert entry["plan"]["allocation"] == "greedy" and entry["sensitivity"] == SENSITIVITY_FILE
    plan = larosa_plan(out)
    shapes = module_shapes(LlamaArch.from_model_dir(out))
    total = sum(s.params for s in shapes.values()) * 3
    assert plan.achieved(shapes) == pytest.approx(0.4, abs=max(s.out_features for s in shapes.values()) / total)
    sparse = load_llama(out, make_linear=larosa_linear_factory(out))
    for index, layer in enumerate(sparse.layers):
        for kind in SPARSE_MODULES:
            linear = getattr(layer, kind)
            assert getattr(linear, "k", None) == plan.kept(kind, linear.in_features, index)
    run_window(sparse, windows[0])
    assert larosa_plan(out, 0.25).achieved(shapes) == pytest.approx(0.25, abs=0.01)  # re-planned from the table
    assert larosa_plan(out, allocation="fixed-ratio").layer_sparsity == ()


def rotated_folder_with_module_levels(tmp_path: Path) -> Path:
    """A rotated tiny fp32 Llama whose manifest plans one sparsity level per module kind (the version-1 format)."""
    source = write_tiny_llama(tmp_path / "dense", dtype=torch.float32)
    out = save_rotated(source, tmp_path / "rotated", random_rotations(3, 64), torch.float32)
    levels = {"qkv_proj": 0.25, "o_proj": 0.5, "gate_up_proj": 0.25, "down_proj": 0.5}
    update_manifest(out, "larosa", {"version": 1, "sparsity": 0.4, "plan": {"target": 0.4, "module_sparsity": levels}})
    return out


def test_folder_with_one_level_per_module_kind_still_loads_and_serves(tmp_path: Path) -> None:
    out = rotated_folder_with_module_levels(tmp_path)
    sparse = load_llama(out, make_linear=larosa_linear_factory(out))
    assert {layer.o_proj.k for layer in sparse.layers} == {32}
    assert {layer.down_proj.k for layer in sparse.layers} == {64}
    run_window(sparse, torch.arange(20))


def test_larosa_model_computes_large_steps_in_bf16_like_the_dense_model(tmp_path: Path) -> None:
    """Mixed precision applies to a LaRoSA model too: bf16 blocks from BF16_MIN_ROWS tokens and a bf16 KV cache."""
    out = rotated_folder_with_module_levels(tmp_path)
    mixed = load_llama(out, make_linear=larosa_linear_factory(out))
    assert mixed.kv_dtype == torch.bfloat16
    assert mixed.compute_dtype(16) == torch.bfloat16
    assert mixed.compute_dtype(1) == (torch.bfloat16 if BF16_MIN_ROWS <= 1 else torch.float32)
    exact = load_llama(out, make_linear=larosa_linear_factory(out, dense=dense_linear_factory))
    assert exact.kv_dtype == torch.float32 and exact.compute_dtype(16) == torch.float32
    ids = torch.arange(24)  # one 24-token prefill: the dense path, in bf16 for the mixed model
    expected = logits_of(exact, ids)
    torch.testing.assert_close(logits_of(mixed, ids), expected, rtol=0, atol=0.05 * expected.abs().max().item())


def step_with_caches(model: LlamaModel, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and the keys written by one prefill step of `ids` into fresh caches."""
    arch, n = model.arch, ids.shape[0]
    keys = [torch.zeros(1, n, arch.num_kv_heads, arch.head_dim, dtype=model.kv_dtype) for _ in model.layers]
    values = [torch.zeros_like(k) for k in keys]
    hidden = model.forward(ids, SlotBatch.build([0], [n], [n]), keys, values)
    return model.lm_head(hidden), keys


def sparse_layer_calls(model: LlamaModel) -> int:
    layers = [m for layer in model.layers for m in vars(layer).values() if isinstance(m, TopKSparseLinear)]
    return sum(layer.stats.sparse_calls + layer.stats.dense_calls for layer in layers)


def test_dense_twin_takes_large_steps_without_adapters_and_computes_the_same_logits_and_keys(tmp_path: Path) -> None:
    out = rotated_folder_with_module_levels(tmp_path)
    model = load_llama(out, make_linear=larosa_linear_factory(out, dense=dense_linear_factory))
    expected_logits, expected_keys = step_with_caches(model, torch.arange(24))  # the layers' own dense paths
    assert attach_dense_twin(model, dense_linear_factory)
    twin = model.dense_twin
    # at every measured thread count one token computes sparsely and 17 never do
    assert all(1 < step <= SPARSE_MAX_ROWS + 1 for step in twin.from_tokens.values())
    assert all(layer.residual_adapter is None for layer in twin.model.layers)
    calls_before = sparse_layer_calls(model)
    logits, keys = step_with_caches(model, torch.arange(24))
    assert sparse_layer_calls(model) == calls_before, "a 24-token step runs on the twin alone"
    torch.testing.assert_close(logits, expected_logits, rtol=0, atol=1e-4)
    for got, expected in zip(keys, expected_keys, strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    step_with_caches(model, torch.arange(1))
    assert sparse_layer_calls(model) > calls_before, "a one-token step runs the sparse layers"


def test_dense_twin_is_refused_where_it_would_compute_something_else_or_save_nothing(tmp_path: Path) -> None:
    out = rotated_folder_with_module_levels(tmp_path)
    plan = larosa_plan(out)
    masked = load_llama(out, make_linear=sparse_linear_factory(plan, dense_linear_factory, mask_dense_path=True))
    assert not attach_dense_twin(masked, dense_linear_factory) and masked.dense_twin is None
    unrotated = load_llama(tmp_path / "dense", make_linear=sparse_linear_factory(plan, dense_linear_factory))
    assert not attach_dense_twin(unrotated, dense_linear_factory) and unrotated.dense_twin is None


def test_engine_serves_a_larosa_folder_with_a_mixed_precision_dense_twin(tmp_path: Path) -> None:
    out = rotated_folder_with_module_levels(tmp_path)
    model = load_model_for_engine(out, "auto", max_positions=64)
    assert model.dense_twin is not None and model.dense_twin.model.kv_dtype == model.kv_dtype == torch.bfloat16
    exact = load_llama(out, make_linear=dense_linear_factory)
    expected, _ = step_with_caches(exact, torch.arange(24))
    got, _ = step_with_caches(model, torch.arange(24))
    torch.testing.assert_close(got, expected, rtol=0, atol=0.05 * expected.abs().max().item())


def test_layer_replay_rebuilds_the_residual_stream_and_errors_grow_with_sparsity(tmp_path: Path) -> None:
    source = write_tiny_llama(tmp_path / "dense", dtype=torch.float32)
    model = load_llama(source, max_positions=32, make_linear=probe_factory)
    replay = LayerReplay(model, 0, 32)
    hidden = torch.nn.functional.embedding(torch.arange(5, 37), model.embed_tokens)
    normalised = replay.normalised_output(hidden)
    rebuilt = rms_norm(replay.residual_output(hidden), None, model.arch.rms_norm_eps)
    torch.testing.assert_close(rebuilt, normalised, rtol=0, atol=1e-6)
    windows = list(torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(4)))
    table = measure_sensitivity(source, windows, progress=False)
    assert len(table.errors) == 3 and len(table.layer_weights) == 3 and min(table.layer_weights) > 0
    for layer in table.errors:
        for curve in layer.values():
            assert curve[0] == 0 and curve[-1] > curve[len(curve) // 2] > 0
    assert SensitivityTable.from_json(table.to_json()) == table


@pytest.mark.slow
def test_rotated_smollm2_reproduces_logits_in_float32(tmp_path: Path) -> None:
    from fusedserve.engine.model.default_model import ensure_default_model

    source = ensure_default_model()
    ids = torch.arange(100, 164)
    dense = load_llama(source, max_positions=64, make_linear=fp32_dense_factory)  # no bf16 prefill
    expected = logits_of(dense, ids)
    del dense
    windows = [torch.arange(1000, 1128)]
    config = CalibrationConfig(sparsity=0.4, allocation="fixed-ratio")  # the logits, not the allocation
    out = build_larosa_model(source, tmp_path / "larosa", config, windows, "ids", progress=False)
    got = logits_of(load_llama(out, max_positions=64, make_linear=fp32_dense_factory), ids)
    assert (got - expected).abs().max().item() < 1e-3 * expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
