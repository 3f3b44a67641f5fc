"""EngineMetrics on synthetic steps and requests: vLLM names, types, buckets; exact counts; gauges; extras."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from starlette.testclient import TestClient

import fusedserve
from fusedserve.engine.adaptivocab.patch_data import VocabPatch
from fusedserve.engine.kv_cache import KVUsage
from fusedserve.engine.observer import StepStats
from fusedserve.engine.request import Request, RequestStatus
from fusedserve.engine.sampling_params import SamplingParams
from fusedserve.server.metrics import (
    ITERATION_TOKENS_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    TOKEN_LATENCY_BUCKETS,
    TTFT_BUCKETS,
    EngineMetrics,
    build_1_2_5_buckets,
    exported_sample_names,
)

MODEL = "tiny"
IDLE = KVUsage(bytes_mapped=0, bytes_live=0, bytes_budget=1 << 20, slots_in_use=0, usage_perc=0.0)

VLLM_TYPES = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:num_preemptions": "counter",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:request_success": "counter",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:request_time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
    "vllm:iteration_tokens_total": "histogram",
}


def make_metrics(**kwargs: object) -> EngineMetrics:
    return EngineMetrics(MODEL, max_model_len=1024, process_metrics=False, **kwargs)  # type: ignore[arg-type]


def value(metrics: EngineMetrics, name: str, **labels: str) -> float:
    sample = metrics.registry.get_sample_value(name, {"model_name": MODEL, **labels})
    assert sample is not None, f"{name}{labels} is not exported"
    return sample


def info_labels(metrics: EngineMetrics) -> dict[str, str]:
    family = next(f for f in metrics.registry.collect() if f.name == "fusedserve:model")
    (sample,) = family.samples
    assert sample.name == "fusedserve:model_info" and sample.value == 1
    return dict(sample.labels)


def step(running: int = 1, waiting: int = 0, **fields: object) -> StepStats:
    defaults: dict[str, object] = dict(
        step_seconds=0.02, num_scheduled_tokens=10, num_prompt_tokens=8, num_generation_tokens=2,
        num_running=running, num_waiting=waiting, num_preemptions=0,
        kv_usage=KVUsage(bytes_mapped=4096, bytes_live=1024, bytes_budget=1 << 20, slots_in_use=running,
                         usage_perc=0.25),
    )  # fmt: skip
    return StepStats(**{**defaults, **fields})  # type: ignore[arg-type]


def finished_request(
    status: RequestStatus = RequestStatus.FINISHED_LENGTH,
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    scheduled: bool = True,
) -> Request:
    """A request that arrived at t=100, was scheduled at 100.5, got tokens each 0.1 s from 101, finished."""
    prompt = prompt if prompt is not None else [1, 2, 3, 4]
    output = output if output is not None else [7, 8, 9]
    request = Request("r", prompt, SamplingParams(), len(prompt) + 16, arrival_time=100.0)
    request.status = status
    if scheduled:
        request.first_scheduled_time = 100.5
        request.num_prompt_tokens_seen = len(prompt)
        request.output_token_ids = list(output)
        if output:
            request.first_token_time = 101.0
            request.last_token_time = 101.0 + 0.1 * (len(output) - 1)
    request.finished_time = (request.last_token_time or 100.25) + 0.01
    return request


def test_vllm_metrics_have_vllm_names_and_types() -> None:
    families = {family.name: family.type for family in make_metrics().registry.collect()}
    assert {name: families.get(name) for name in VLLM_TYPES} == VLLM_TYPES


def test_counters_export_with_total_suffix_and_model_name_label() -> None:
    names = exported_sample_names(make_metrics().registry)
    for counter in ("num_preemptions", "prompt_tokens", "generation_tokens", "request_success"):
        assert f"vllm:{counter}_total" in names
    assert "vllm:iteration_tokens_total_bucket" in names
    assert 'model_name="tiny"' in generate_latest(make_metrics().registry).decode()


@pytest.mark.parametrize(
    ("name", "buckets"),
    [
        ("vllm:time_to_first_token_seconds", TTFT_BUCKETS),
        ("vllm:inter_token_latency_seconds", TOKEN_LATENCY_BUCKETS),
        ("vllm:request_time_per_output_token_seconds", TOKEN_LATENCY_BUCKETS),
        ("vllm:e2e_request_latency_seconds", REQUEST_LATENCY_BUCKETS),
        ("vllm:request_queue_time_seconds", REQUEST_LATENCY_BUCKETS),
        ("vllm:request_prefill_time_seconds", REQUEST_LATENCY_BUCKETS),
        ("vllm:request_decode_time_seconds", REQUEST_LATENCY_BUCKETS),
        ("vllm:iteration_tokens_total", ITERATION_TOKENS_BUCKETS),
        ("vllm:request_prompt_tokens", [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]),
        ("vllm:request_generation_tokens", [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000]),
    ],
)
def test_histogram_buckets_are_vllms(name: str, buckets: list[float]) -> None:
    family = next(f for f in make_metrics().registry.collect() if f.name == name)
    edges = [s.labels["le"] for s in family.samples if s.name == f"{name}_bucket"]
    assert edges == [str(float(b)) for b in buckets] + ["+Inf"]


def test_vllm_bucket_lists_are_exact() -> None:
    assert TTFT_BUCKETS == [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                            7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]  # fmt: skip
    assert REQUEST_LATENCY_BUCKETS[:3] == [0.3, 0.5, 0.8] and REQUEST_LATENCY_BUCKETS[-2:] == [1920.0, 7680.0]
    assert build_1_2_5_buckets(4096) == [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000]


def test_every_finish_reason_is_exported_at_zero_before_any_request() -> None:
    metrics = make_metrics()
    for reason in ("stop", "length", "abort", "error"):
        assert value(metrics, "vllm:request_success_total", finished_reason=reason) == 0


def test_counters_and_histograms_count_exactly_after_n_steps() -> None:
    metrics = make_metrics()
    for i in range(5):
        stats = step(num_preemptions=i % 2, time_to_first_token=[0.3], inter_token_latency=[0.05, 0.07])
        stats.pages_mapped, stats.pages_unmapped = 3, 1
        metrics.on_step(stats)
    assert value(metrics, "vllm:prompt_tokens_total") == 40
    assert value(metrics, "vllm:generation_tokens_total") == 10
    assert value(metrics, "vllm:num_preemptions_total") == 2
    assert value(metrics, "vllm:iteration_tokens_total_count") == 5
    assert value(metrics, "vllm:iteration_tokens_total_sum") == 50
    assert value(metrics, "vllm:iteration_tokens_total_bucket", le="16.0") == 5
    assert value(metrics, "vllm:iteration_tokens_total_bucket", le="8.0") == 0
    assert value(metrics, "vllm:time_to_first_token_seconds_count") == 5
    assert value(metrics, "vllm:time_to_first_token_seconds_sum") == pytest.approx(1.5)
    assert value(metrics, "vllm:inter_token_latency_seconds_count") == 10
    assert value(metrics, "vllm:inter_token_latency_seconds_bucket", le="0.05") == 5
    assert value(metrics, "fusedserve:engine_step_seconds_count") == 5
    assert value(metrics, "fusedserve:kv_pages_mapped_total") == 15
    assert value(metrics, "fusedserve:kv_pages_unmapped_total") == 5
    assert value(metrics, "vllm:kv_cache_usage_perc") == 0.25
    assert value(metrics, "fusedserve:kv_cache_bytes_mapped") == 4096
    assert value(metrics, "fusedserve:kv_cache_bytes_live") == 1024


def test_steps_that_ran_no_model_count_tokens_but_not_iterations() -> None:
    metrics = make_metrics()
    metrics.on_step(step(num_scheduled_tokens=0, num_prompt_tokens=0, num_generation_tokens=0))
    assert value(metrics, "vllm:iteration_tokens_total_count") == 0
    assert value(metrics, "fusedserve:engine_step_seconds_count") == 0


def test_gauges_return_to_zero_with_the_last_step() -> None:
    metrics = make_metrics()
    metrics.on_step(step(running=3, waiting=2))
    assert value(metrics, "vllm:num_requests_running") == 3
    assert value(metrics, "vllm:num_requests_waiting") == 2
    metrics.on_step(step(running=0, waiting=0, kv_usage=IDLE))
    for gauge in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                  "fusedserve:kv_cache_bytes_live", "fusedserve:kv_cache_slots_in_use"):  # fmt: skip
        assert value(metrics, gauge) == 0, gauge


def test_finished_requests_fill_the_per_request_histograms_exactly() -> None:
    metrics = make_metrics()
    for _ in range(3):
        metrics.on_request_finished(finished_request())
    metrics.on_request_finished(finished_request(RequestStatus.FINISHED_STOPPED, output=[5]))
    assert value(metrics, "vllm:request_success_total", finished_reason="length") == 3
    assert value(metrics, "vllm:request_success_total", finished_reason="stop") == 1
    assert value(metrics, "vllm:e2e_request_latency_seconds_count") == 4
    assert value(metrics, "vllm:e2e_request_latency_seconds_sum") == pytest.approx(3 * 1.21 + 1.01)
    assert value(metrics, "vllm:request_queue_time_seconds_sum") == pytest.approx(4 * 0.5)
    assert value(metrics, "vllm:request_prefill_time_seconds_sum") == pytest.approx(4 * 0.5)
    assert value(metrics, "vllm:request_decode_time_seconds_count") == 4
    assert value(metrics, "vllm:request_decode_time_seconds_sum") == pytest.approx(3 * 0.2)
    # One-token requests have no time per output token.
    assert value(metrics, "vllm:request_time_per_output_token_seconds_count") == 3
    assert value(metrics, "vllm:request_time_per_output_token_seconds_sum") == pytest.approx(3 * 0.1)
    assert value(metrics, "vllm:request_prompt_tokens_sum") == 16
    assert value(metrics, "vllm:request_generation_tokens_sum") == 10
    assert value(metrics, "vllm:request_generation_tokens_bucket", le="1.0") == 1


def test_a_request_aborted_while_waiting_observes_no_phase_it_never_reached() -> None:
    metrics = make_metrics()
    metrics.on_request_finished(finished_request(RequestStatus.FINISHED_ABORTED, scheduled=False))
    assert value(metrics, "vllm:request_success_total", finished_reason="abort") == 1
    assert value(metrics, "vllm:e2e_request_latency_seconds_count") == 1
    assert value(metrics, "vllm:request_generation_tokens_sum") == 0
    for phase in ("queue", "prefill", "decode"):
        assert value(metrics, f"vllm:request_{phase}_time_seconds_count") == 0


def test_adaptivocab_tokens_saved_count_merged_ids_of_computed_tokens() -> None:
    metrics = make_metrics(tokens_saved_by_id={100: 2, 101: 1})
    request = finished_request(prompt=[100, 5, 101, 100], output=[100, 100, 7])
    request.num_prompt_tokens_seen = 3  # aborted before the last prompt token was computed
    metrics.on_request_finished(request)
    assert value(metrics, "fusedserve:adaptivocab_tokens_saved_total", kind="prompt") == 3
    assert value(metrics, "fusedserve:adaptivocab_tokens_saved_total", kind="generation") == 4


def test_for_model_reads_the_manifest_and_the_vocabulary_patch(tmp_path: Path) -> None:
    VocabPatch(max_n=3, new_tokens={900: (1, 2, 3), 901: (4, 5)}, removed={900: (6, 7), 901: (8, 9)},
               vocab_size=1000).save(tmp_path)  # fmt: skip
    manifest = {
        "adaptivocab": {"patch_file": "adaptivocab_patch.json", "replaced": 2, "top_new_tokens": ["a", "b"]},
        "gstack": {"base": "SmolLM2-135M", "factor": 2, "base_layers": 30},
        "larosa": {"sparsity": 0.4},
    }
    (tmp_path / "fusedserve.json").write_text(json.dumps(manifest))
    metrics = EngineMetrics.for_model(tmp_path, MODEL, 1024, process_metrics=False)
    metrics.on_request_finished(finished_request(prompt=[900, 1], output=[901, 901]))
    assert value(metrics, "fusedserve:adaptivocab_tokens_saved_total", kind="prompt") == 2
    assert value(metrics, "fusedserve:adaptivocab_tokens_saved_total", kind="generation") == 2
    assert value(metrics, "fusedserve:larosa_activation_sparsity") == 0.4
    assert info_labels(metrics) == {
        "model_name": MODEL, "fusedserve_version": fusedserve.__version__,
        "techniques": "gstack,adaptivocab,larosa", "gstack_base": "SmolLM2-135M", "gstack_factor": "2",
        "gstack_base_layers": "30", "adaptivocab_patch_file": "adaptivocab_patch.json",
        "adaptivocab_replaced": "2", "larosa_sparsity": "0.4",
    }  # fmt: skip  (lists such as top_new_tokens are left out)


def test_a_plain_model_folder_reports_no_technique(tmp_path: Path) -> None:
    metrics = EngineMetrics.for_model(tmp_path, MODEL, 1024, process_metrics=False)
    assert info_labels(metrics)["techniques"] == "none"
    assert value(metrics, "fusedserve:larosa_activation_sparsity") == 0
    metrics.on_request_finished(finished_request(prompt=[900], output=[900]))
    assert value(metrics, "fusedserve:adaptivocab_tokens_saved_total", kind="generation") == 0


def test_instances_keep_separate_registries() -> None:
    first, second = make_metrics(), make_metrics()
    first.on_step(step())
    assert value(first, "vllm:prompt_tokens_total") == 8
    assert value(second, "vllm:prompt_tokens_total") == 0


def test_process_metrics_are_exported_when_asked() -> None:
    names = exported_sample_names(EngineMetrics(MODEL, 1024).registry)
    assert "process_resident_memory_bytes" in names and "python_info" in names


def test_a_recording_failure_is_logged_not_raised_into_the_engine(caplog: pytest.LogCaptureFixture) -> None:
    metrics = make_metrics()
    broken = step(kv_usage=None)
    with caplog.at_level(logging.ERROR, logger="fusedserve.server.metrics"):
        metrics.on_step(broken)
    assert "recording step metrics failed" in caplog.text


def test_metrics_route_serves_the_servers_registry() -> None:
    from fusedserve.server.app import create_app
    from fusedserve.server.config import ServerConfig

    metrics = make_metrics()
    metrics.on_step(step())
    app = create_app(engine=None, config=ServerConfig(served_model_names=[MODEL]),  # type: ignore[arg-type]
                     metrics_registry=metrics.registry)  # fmt: skip
    response = TestClient(app).get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert 'vllm:prompt_tokens_total{model_name="tiny"} 8.0' in response.text
