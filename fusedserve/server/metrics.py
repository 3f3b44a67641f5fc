"""Prometheus metrics for one model: the engine observer that fills them, and the registry /metrics serves.

vLLM's metrics keep vLLM's exact names, types, buckets and `model_name` label, because gateways, autoscalers
and dashboards already read them: never rename one. Ours live under `fusedserve:`: KV memory mapped vs live
and page maps (vAttention), tokens saved by the adapted vocabulary (AdaptiVocab), the activation sparsity in
effect (LaRoSA), the model's provenance (an info metric built from its fusedserve.json), the engine step time.

`EngineMetrics` implements the engine's `EngineObserver`: the engine thread calls it after every step and for
every finished request. prometheus-client metrics are thread-safe, so the event loop may render the registry
at any time. Each instance owns its CollectorRegistry (tests build several side by side). It must never raise
into the engine thread: a failure to record is logged, and the engine goes on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

import fusedserve
from fusedserve.engine.manifest import read_manifest
from fusedserve.engine.observer import StepStats
from fusedserve.engine.request import Request, RequestStatus

log = logging.getLogger(__name__)

# vLLM's buckets, copied exactly so its dashboards and recording rules keep working.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0]
TOKEN_LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                         10.0, 20.0, 40.0, 80.0]
REQUEST_LATENCY_BUCKETS = [0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0]
ITERATION_TOKENS_BUCKETS = [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
# Ours: one engine step on this CPU takes milliseconds (decode) to seconds (a long prefill chunk).
STEP_SECONDS_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5,
                        5.0, 10.0]

FINISHED_REASONS = tuple(status.value for status in RequestStatus if status.finished)
TOKEN_KINDS = ("prompt", "generation")
TECHNIQUES = ("gstack", "adaptivocab", "larosa")
MAX_LABEL_VALUE_CHARS = 256


def build_1_2_5_buckets(max_value: int) -> list[int]:
    """1, 2, 5, 10, 20, 50, ... up to max_value (vLLM's buckets for per-request token counts)."""
    buckets: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return buckets
            buckets.append(value)
        exponent += 1


def provenance_labels(manifest: Mapping[str, Any]) -> dict[str, str]:
    """The model's fusedserve.json as info-metric labels: which techniques, and each one's scalar parameters.

    `techniques` lists the applied techniques ("none" for a plain folder); every scalar entry of a technique
    becomes `<technique>_<key>` (lists and nested objects are left out: a label holds one value).
    """
    applied = [name for name in TECHNIQUES if name in manifest]
    labels = {"fusedserve_version": fusedserve.__version__, "techniques": ",".join(applied) or "none"}
    for technique in applied:
        entry = manifest[technique]
        if not isinstance(entry, Mapping):
            continue
        for key, value in sorted(entry.items()):
            if isinstance(value, bool):
                text = "true" if value else "false"
            elif isinstance(value, int | float | str):
                text = str(value)
            else:
                continue
            labels[re.sub(r"[^a-zA-Z0-9_]", "_", f"{technique}_{key}")] = text[:MAX_LABEL_VALUE_CHARS]
    return labels


def larosa_sparsity(manifest: Mapping[str, Any]) -> float:
    """The activation sparsity LaRoSA applies (its manifest's "sparsity", 0..1); 0 for a dense model."""
    entry = manifest.get("larosa")
    value = entry.get("sparsity") if isinstance(entry, Mapping) else None
    if isinstance(value, int | float) and not isinstance(value, bool) and 0.0 <= value <= 1.0:
        return float(value)
    return 0.0


def adaptivocab_tokens_saved_by_id(model_dir: Path, manifest: Mapping[str, Any]) -> dict[int, int]:
    """For an AdaptiVocab folder: patched id -> original tokens it stands for minus one. Empty otherwise."""
    entry = manifest.get("adaptivocab")
    if not isinstance(entry, Mapping):
        return {}
    from fusedserve.engine.adaptivocab.patch_data import VocabPatch

    patch = VocabPatch.load(Path(model_dir))
    return {token_id: len(pieces) - 1 for token_id, pieces in patch.new_tokens.items()}


def exported_sample_names(registry: CollectorRegistry) -> set[str]:
    """Every series name the registry exports now (histograms as their _bucket/_sum/_count series)."""
    return {sample.name for family in registry.collect() for sample in family.samples}


class EngineMetrics:
    """vLLM-compatible and fusedserve:* metrics for one model, filled from the engine's observer calls."""

    def __init__(
        self,
        model_name: str,
        max_model_len: int,
        manifest: Mapping[str, Any] | None = None,
        tokens_saved_by_id: Mapping[int, int] | None = None,
        registry: CollectorRegistry | None = None,
        process_metrics: bool = True,
    ) -> None:
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry()
        self._tokens_saved_by_id = dict(tokens_saved_by_id or {})
        if process_metrics:  # what prometheus-client's default registry exports: process_*, python_*
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)
        manifest = manifest or {}
        labels = ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=self.registry).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=self.registry).labels(model_name)

        def histogram(name: str, doc: str, buckets: list[float] | list[int]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        # -- vLLM: scheduler state ----------------------------------------------------------------------
        self.num_requests_running = gauge("vllm:num_requests_running", "Requests in model execution.")
        self.num_requests_waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage_perc = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent.")
        self.num_preemptions = counter("vllm:num_preemptions", "Cumulative number of preemptions.")
        # -- vLLM: tokens ----------------------------------------------------------------------------------
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Number of generation tokens processed.")
        self.iteration_tokens = histogram(
            "vllm:iteration_tokens_total", "Tokens per engine step.", ITERATION_TOKENS_BUCKETS
        )
        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS
        )
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds", "Inter-token latency in seconds.", TOKEN_LATENCY_BUCKETS
        )
        # -- vLLM: finished requests ----------------------------------------------------------------------
        success = Counter(
            "vllm:request_success",
            "Count of finished requests by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.request_success = {reason: success.labels(model_name, reason) for reason in FINISHED_REASONS}
        self.e2e_request_latency = histogram(
            "vllm:e2e_request_latency_seconds", "End-to-end request latency.", REQUEST_LATENCY_BUCKETS
        )
        self.request_queue_time = histogram(
            "vllm:request_queue_time_seconds", "Time spent in the WAITING phase.", REQUEST_LATENCY_BUCKETS
        )
        self.request_prefill_time = histogram(
            "vllm:request_prefill_time_seconds", "Time spent in the PREFILL phase.", REQUEST_LATENCY_BUCKETS
        )
        self.request_decode_time = histogram(
            "vllm:request_decode_time_seconds", "Time spent in the DECODE phase.", REQUEST_LATENCY_BUCKETS
        )
        self.request_time_per_output_token = histogram(
            "vllm:request_time_per_output_token_seconds",
            "Mean time per output token of each request.",
            TOKEN_LATENCY_BUCKETS,
        )
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.request_prompt_tokens = histogram(
            "vllm:request_prompt_tokens", "Prompt tokens of each request.", token_buckets
        )
        self.request_generation_tokens = histogram(
            "vllm:request_generation_tokens", "Generated tokens of each request.", token_buckets
        )
        # -- fusedserve: vAttention KV memory ------------------------------------------------------------
        self.kv_bytes_mapped = gauge("fusedserve:kv_cache_bytes_mapped", "Physical bytes backing the KV.")
        self.kv_bytes_live = gauge("fusedserve:kv_cache_bytes_live", "KV bytes of running requests.")
        self.kv_bytes_budget = gauge("fusedserve:kv_cache_bytes_budget", "Physical KV byte budget.")
        self.kv_slots_in_use = gauge("fusedserve:kv_cache_slots_in_use", "KV slots of running requests.")
        self.kv_pages_mapped = counter("fusedserve:kv_pages_mapped", "Physical KV pages mapped (vAttention).")
        self.kv_pages_unmapped = counter("fusedserve:kv_pages_unmapped", "Physical KV pages unmapped.")
        # -- fusedserve: the engine and the techniques ------------------------------------------------
        self.engine_step_seconds = histogram(
            "fusedserve:engine_step_seconds", "Time of engine steps that ran the model.", STEP_SECONDS_BUCKETS
        )
        saved = Counter(
            "fusedserve:adaptivocab_tokens_saved",
            "Original-vocabulary tokens the AdaptiVocab ids of finished requests stand for, minus those ids.",
            ["model_name", "kind"],
            registry=self.registry,
        )
        self.tokens_saved = {kind: saved.labels(model_name, kind) for kind in TOKEN_KINDS}
        self.activation_sparsity = gauge(
            "fusedserve:larosa_activation_sparsity", "Share of linear-layer inputs LaRoSA skips (0..1)."
        )
        self.activation_sparsity.set(larosa_sparsity(manifest))
        info = Info("fusedserve:model", "Model provenance (fusedserve.json).", labels, registry=self.registry)
        info.labels(model_name).info(provenance_labels(manifest))

    @classmethod
    def for_model(cls, model_dir: Path, model_name: str, max_model_len: int, **kwargs: Any) -> EngineMetrics:
        """Metrics for a model folder: its manifest and, for an AdaptiVocab folder, its vocabulary patch."""
        manifest = read_manifest(Path(model_dir))
        saved = adaptivocab_tokens_saved_by_id(Path(model_dir), manifest)
        return cls(model_name, max_model_len, manifest=manifest, tokens_saved_by_id=saved, **kwargs)

    # -- EngineObserver ---------------------------------------------------------------------------------
    def on_step(self, stats: StepStats) -> None:
        try:
            self._record_step(stats)
        except Exception:  # noqa: BLE001 - metrics must never stop the engine
            log.exception("recording step metrics failed")

    def on_request_finished(self, request: Request) -> None:
        try:
            self._record_finished(request)
        except Exception:  # noqa: BLE001 - metrics must never stop the engine
            log.exception("recording metrics of request %s failed", request.request_id)

    # -- recording ----------------------------------------------------------------------------------------
    def _record_step(self, stats: StepStats) -> None:
        self.num_requests_running.set(stats.num_running)
        self.num_requests_waiting.set(stats.num_waiting)
        usage = stats.kv_usage
        self.kv_cache_usage_perc.set(usage.usage_perc)
        self.kv_bytes_mapped.set(usage.bytes_mapped)
        self.kv_bytes_live.set(usage.bytes_live)
        self.kv_bytes_budget.set(usage.bytes_budget)
        self.kv_slots_in_use.set(usage.slots_in_use)
        self.num_preemptions.inc(stats.num_preemptions)
        self.prompt_tokens.inc(stats.num_prompt_tokens)
        self.generation_tokens.inc(stats.num_generation_tokens)
        self.kv_pages_mapped.inc(stats.pages_mapped)
        self.kv_pages_unmapped.inc(stats.pages_unmapped)
        if stats.num_scheduled_tokens > 0:  # steps that only hand out aborts run no model
            self.iteration_tokens.observe(stats.num_scheduled_tokens)
            self.engine_step_seconds.observe(stats.step_seconds)
        for seconds in stats.time_to_first_token:
            self.time_to_first_token.observe(seconds)
        for seconds in stats.inter_token_latency:
            self.inter_token_latency.observe(seconds)

    def _record_finished(self, request: Request) -> None:
        """vLLM's per-request intervals: queue (arrival to first scheduled), prefill (to first token), decode
        (first to last token), e2e (arrival to finish). A phase the request never reached is not observed."""
        self.request_success[request.status.value].inc()
        finished = request.finished_time if request.finished_time is not None else request.last_token_time
        if finished is not None:
            self.e2e_request_latency.observe(max(0.0, finished - request.arrival_time))
        self.request_prompt_tokens.observe(request.num_prompt_tokens)
        self.request_generation_tokens.observe(request.num_output_tokens)
        if request.first_scheduled_time is not None:
            self.request_queue_time.observe(request.first_scheduled_time - request.arrival_time)
            if request.first_token_time is not None:
                self.request_prefill_time.observe(request.first_token_time - request.first_scheduled_time)
        if request.first_token_time is not None and request.last_token_time is not None:
            decode = request.last_token_time - request.first_token_time
            self.request_decode_time.observe(decode)
            if request.num_output_tokens > 1:
                self.request_time_per_output_token.observe(decode / (request.num_output_tokens - 1))
        if self._tokens_saved_by_id:
            computed_prompt = request.prompt_token_ids[: request.num_prompt_tokens_seen]
            self.tokens_saved["prompt"].inc(self._saved(computed_prompt))
            self.tokens_saved["generation"].inc(self._saved(request.output_token_ids))

    def _saved(self, token_ids: list[int]) -> int:
        lookup = self._tokens_saved_by_id.get
        return sum(lookup(token_id, 0) for token_id in token_ids)
