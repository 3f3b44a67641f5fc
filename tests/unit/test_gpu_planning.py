"""The device-independent parts of the GPU path, on the CPU: flashinfer planning, device choice, unmap ordering.

The flashinfer plan is checked by reading the caches the way flashinfer's paged decode documents it (sequence b
reads pages indices[indptr[b]:indptr[b+1]], the last one up to last_page_len) and comparing with the CPU
attention over K[slot, :len]. The Triton kernel runs under Triton's CPU interpreter where triton is installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from fusedserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fusedserve.engine.device import DeviceUnavailableError, resolve_device, resolve_dtype
from fusedserve.engine.kv_cache import KVCacheSpec
from fusedserve.engine.llm_engine import LLMEngine
from fusedserve.engine.model.random_model import write_random_llama
from fusedserve.engine.sampling_params import SamplingParams
from fusedserve.engine.vattention.cuda_backend import CudaMemoryBackend
from fusedserve.engine.vattention.emulated_driver import EmulatedCudaDriver
from fusedserve.engine.vattention.kv_cache import VAttentionKVCache
from fusedserve.kernels.attention import SlotBatch, attend
from fusedserve.kernels.gpu.flashinfer_attention import (
    DecodePlan,
    decode_plan_arguments,
    decode_plan_for_batch,
    flashinfer_can_read,
)
from fusedserve.kernels.gpu.sparse_gemv import use_sparse_gemv

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def one_thread() -> None:
    torch.set_num_threads(1)


# -- flashinfer planning ---------------------------------------------------------------------------
def test_decode_plan_presents_each_slot_as_one_page_of_max_model_len():
    plan = decode_plan_arguments(
        [5, 0, 3], [17, 1, 256], max_model_len=256, num_qo_heads=9, num_kv_heads=3, head_dim=64,
        q_dtype=torch.bfloat16, kv_dtype=torch.bfloat16, scale=0.125,
    )
    assert plan.indptr.tolist() == [0, 1, 2, 3]
    assert plan.indices.tolist() == [5, 0, 3]
    assert plan.last_page_len.tolist() == [17, 1, 256]
    assert {plan.indptr.dtype, plan.indices.dtype, plan.last_page_len.dtype} == {torch.int32}
    assert {plan.indptr.device.type, plan.indices.device.type} == {"cpu"}  # plan() wants host tensors
    args, kwargs = plan.plan_call()
    assert args[3:] == (9, 3, 64, 256)
    assert kwargs == {"q_data_type": torch.bfloat16, "kv_data_type": torch.bfloat16, "sm_scale": 0.125}


@pytest.mark.parametrize(
    ("slots", "lens", "message"),
    [
        ([0], [0], "outside"),
        ([0], [257], "outside"),
        ([1, 1], [3, 4], "twice"),
        ([8], [3], "outside the cache's 8 slots"),
        ([0], [], "context lengths"),
    ],
)
def test_decode_plan_rejects_lengths_and_slots_the_cache_cannot_hold(slots, lens, message):
    with pytest.raises(ValueError, match=message):
        decode_plan_arguments(slots, lens, 256, 4, 2, 64, torch.float16, torch.float16, 1.0, num_slots=8)


def paged_decode_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: DecodePlan):
    """What flashinfer's paged decode computes from a plan, per its documented page-table semantics."""
    group = plan.num_qo_heads // plan.num_kv_heads
    outputs = []
    for b in range(len(plan.last_page_len)):
        pages = plan.indices[plan.indptr[b] : plan.indptr[b + 1]].tolist()
        sizes = [plan.page_size] * (len(pages) - 1) + [int(plan.last_page_len[b])]
        keys = torch.cat([k_cache[page, :size] for page, size in zip(pages, sizes, strict=True)])
        values = torch.cat([v_cache[page, :size] for page, size in zip(pages, sizes, strict=True)])
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[b], keys) * plan.sm_scale
        outputs.append(torch.einsum("hn,nhd->hd", scores.softmax(-1), values))
    return torch.stack(outputs)


def all_layers_caches(num_slots: int, max_len: int, layers: int, kv_heads: int, head_dim: int, layer: int):
    """Per-layer K/V views of one [slots, tokens, layers, 2, kv_heads, head_dim] buffer (vAttention's layout)."""
    buffer = torch.randn(num_slots, max_len, layers, 2, kv_heads, head_dim)
    return buffer[:, :, layer, 0], buffer[:, :, layer, 1]


def test_the_decode_plan_reads_the_same_tokens_as_cpu_attention_over_the_slots():
    k_cache, v_cache = all_layers_caches(num_slots=6, max_len=64, layers=3, kv_heads=2, head_dim=16, layer=1)
    assert not k_cache.is_contiguous()  # strided like the engine's "all_layers" views
    # A mixed step: decodes in slots 4, 1, 5 and a prefill chunk in slot 2.
    batch = SlotBatch.build(slots=[4, 2, 1, 5], query_lens=[1, 7, 1, 1], context_lens=[33, 20, 1, 64])
    q = torch.randn(batch.num_tokens, 6, 16)
    plan = decode_plan_for_batch(batch, q, k_cache, scale=0.25)
    assert plan.indices.tolist() == [4, 1, 5] and plan.last_page_len.tolist() == [33, 1, 64]
    expected = attend(q, k_cache, v_cache, batch, 0.25).view(batch.num_tokens, 6, 16)[batch.decode_rows]
    got = paged_decode_reference(q.index_select(0, batch.decode_rows), k_cache, v_cache, plan)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_flashinfer_reads_bf16_static_and_vattention_layouts_in_place():
    q = torch.empty(3, 8, 64, dtype=torch.bfloat16)
    static = torch.empty(4, 128, 2, 64, dtype=torch.bfloat16)
    assert flashinfer_can_read(q, static, torch.empty_like(static)) is None
    spec = KVCacheSpec(num_layers=2, max_num_seqs=4, max_model_len=128, num_kv_heads=2, head_dim=64,
                       dtype=torch.bfloat16)
    cache = VAttentionKVCache(spec, 64 * 1024, 8 * 64 * 1024, layout="all_layers")
    try:
        assert flashinfer_can_read(q, cache.key_cache[1], cache.value_cache[1]) is None
    finally:
        cache.close()


def test_flashinfer_is_skipped_for_dtypes_head_sizes_and_strides_it_cannot_read():
    fp32 = torch.empty(4, 128, 2, 64)
    assert "dtypes" in flashinfer_can_read(torch.empty(1, 8, 64), fp32, fp32)
    odd = torch.empty(4, 128, 2, 80, dtype=torch.bfloat16)
    assert "head_dim" in flashinfer_can_read(torch.empty(1, 8, 80, dtype=torch.bfloat16), odd, odd)
    huge = torch.empty_strided((4, 128, 2, 64), (2**33, 128, 64, 1), dtype=torch.bfloat16, device="meta")
    assert "32-bit" in flashinfer_can_read(torch.empty(1, 8, 64, dtype=torch.bfloat16, device="meta"), huge, huge)


def test_slot_batch_index_tensors_land_on_the_requested_device():
    batch = SlotBatch.build([0, 1], [3, 1], [3, 9], device="meta")
    assert {t.device.type for t in (batch.slot_of_token, batch.position_of_token, batch.decode_rows)} == {"meta"}
    assert batch.slots == [0, 1] and batch.context_lens == [3, 9]  # host lists stay for planning


# -- device selection ------------------------------------------------------------------------------
def test_auto_device_is_cuda_only_when_torch_sees_one():
    assert resolve_device("auto", cuda_devices=0) == torch.device("cpu")
    assert resolve_device("auto", cuda_devices=2) == torch.device("cuda", 0)
    assert resolve_device("cuda:1", cuda_devices=2) == torch.device("cuda", 1)


def test_cuda_without_a_device_is_a_clear_error():
    with pytest.raises(DeviceUnavailableError, match="--device cuda was requested"):
        resolve_device("cuda", cuda_devices=0)
    with pytest.raises(DeviceUnavailableError, match="only 1 CUDA device"):
        resolve_device("cuda:1", cuda_devices=1)
    with pytest.raises(DeviceUnavailableError, match="not supported"):
        resolve_device("mps", cuda_devices=0)


def test_dtype_defaults_keep_the_cpu_policy_and_pick_bf16_on_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert [resolve_dtype(d, cpu) for d in (None, "auto", "float32", "bfloat16")] == [
        "auto", "auto", "float32", "bfloat16"]
    assert [resolve_dtype(d, cuda) for d in (None, "auto", "float32")] == ["bfloat16", "bfloat16", "float32"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_serve_with_device_cuda_exits_2_before_loading_anything(caplog):
    from fusedserve.cli import main

    assert main(["serve", "--device", "cuda"]) == 2
    assert "no CUDA device" in caplog.text or "CPU-only build" in caplog.text


def test_serve_flags_resolve_device_and_dtype_into_the_engine_config(tmp_path: Path):
    from fusedserve.cli import build_parser
    from fusedserve.server.cli import build_engine_config

    args = build_parser().parse_args(["serve", "--device", "cpu", "--max-model-len", "64"])
    config = build_engine_config(args, tmp_path, "m")
    assert (config.model.device, config.model.dtype) == ("cpu", "auto")


# -- the engine on the CPU with the device plumbing ------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from fusedserve.engine.model.default_model import ensure_default_model

    return write_random_llama(tmp_path_factory.mktemp("tiny"), tokenizer_from=ensure_default_model())


def greedy_tokens(model_dir: Path, device: str) -> tuple[LLMEngine, dict[str, list[int]]]:
    config = EngineConfig(
        ModelConfig(model_dir, "tiny", dtype="float32", device=device),
        CacheConfig(kv_backend="vattention", kv_page_size=64 * 1024),
        SchedulerConfig(max_num_seqs=4, max_model_len=128, max_num_batched_tokens=32),
        threads=1,
    )
    engine = LLMEngine.from_config(config)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    for i, n in enumerate((5, 40, 9)):
        engine.add_request(f"r{i}", list(range(10, 10 + n)), params)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(3)}
    while engine.has_work:
        for output in engine.step():
            tokens[output.request_id].extend(output.new_token_ids)
    engine.kv_cache.close()
    return engine, tokens


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto resolves to cuda where a GPU is present")
def test_auto_device_runs_the_cpu_engine_unchanged(tiny_model_dir: Path):
    auto_engine, auto_tokens = greedy_tokens(tiny_model_dir, "auto")
    _, cpu_tokens = greedy_tokens(tiny_model_dir, "cpu")
    assert (auto_engine.config.model.device, auto_engine.config.model.dtype) == ("cpu", "float32")
    assert auto_engine.model.device.type == "cpu" and auto_engine.model.rope.cos.device.type == "cpu"
    assert auto_tokens == cpu_tokens and all(len(t) == 6 for t in auto_tokens.values())


# -- unmapping waits for queued kernels (the CUDA backend against the emulated driver) ---------------
def test_every_unmap_waits_for_the_latest_recorded_step():
    granularity = 64 * 1024
    driver = EmulatedCudaDriver(granularity=granularity, memory_bytes=16 * granularity)
    recorded: list[int] = []

    class StepMarker:
        def __init__(self) -> None:
            recorded.append(len(recorded))
            self.step = recorded[-1]

        def synchronize(self) -> None:
            driver.calls.append(("synchronize", (self.step,)))

    backend = CudaMemoryBackend(0, driver=driver, tensor_device=torch.device("cpu"), work_event=StepMarker)
    spec = KVCacheSpec(num_layers=2, max_num_seqs=4, max_model_len=1024, num_kv_heads=2, head_dim=8,
                       dtype=torch.float32)
    cache = VAttentionKVCache(spec, granularity, 8 * granularity, backend=backend, watermark=0.0,
                              map_ahead_tokens=0)
    try:
        slot = cache.allocate_slot()
        assert cache.reserve_tokens(slot, 600)
        cache.step_queued()
        cache.step_queued()  # the second step's marker is the one to wait for
        cache.free_slot(slot)
        assert cache.release_idle_pages() > 0
    finally:
        cache.close()
        driver.close()
    # One page leaves with one unmap per region; the call before that run must be a wait on step 1's marker.
    calls = [(name, args) for name, args in driver.calls if name in ("synchronize", "cuMemUnmap", "cuMemMap")]
    runs = [i for i, (name, _) in enumerate(calls) if name == "cuMemUnmap" and calls[i - 1][0] != "cuMemUnmap"]
    assert runs and all(calls[i - 1] == ("synchronize", (1,)) for i in runs)


# -- the sparse GEMV -------------------------------------------------------------------------------
def test_sparse_gemv_serves_small_batches_and_leaves_large_ones_to_dense():
    assert use_sparse_gemv(rows=1, k=288, in_features=576)
    assert not use_sparse_gemv(rows=2, k=288, in_features=576)  # reads every weight row: dense is cheaper
    assert use_sparse_gemv(rows=4, k=64, in_features=576)
    assert not use_sparse_gemv(rows=64, k=1, in_features=576)


TRITON_CHECK = textwrap.dedent(
    """
    import torch
    from fusedserve.kernels.gpu.sparse_gemv import topk_sparse_gemv
    from fusedserve.kernels.sparse_linear import topk_mask
    torch.manual_seed(0)
    torch.set_num_threads(1)
    for rows, k, bias in ((1, 37, True), (3, 100, False), (2, 0, True)):
        x, weight, b = torch.randn(rows, 130), torch.randn(70, 130), torch.randn(70)
        out = topk_sparse_gemv(x, weight.t().contiguous(), b if bias else None, k)
        expected = topk_mask(x, k) @ weight.t() + (b if bias else 0)
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    print("ok")
    """
)


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed (the gpu extra)")
def test_triton_sparse_gemv_equals_the_dense_reference_under_the_interpreter():
    # A subprocess: TRITON_INTERPRET must be set before the kernel is built, and must not leak into GPU tests.
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *sys.path])}
    result = subprocess.run(
        [sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
