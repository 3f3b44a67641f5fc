"""Kubernetes files, checked without a cluster: built-in kinds against the Kubernetes JSON schemas (strict), and
the references between Deployment, Service, ServiceMonitor, HPA and the prometheus-adapter rule."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import kubernetes_validate
import pytest
from deploy_checks import (
    KUBERNETES,
    KUBERNETES_VERSION,
    REPO_ROOT,
    exported_metric_names,
    kubernetes_manifests,
    load_yaml,
    load_yaml_documents,
    manifest_of_kind,
    promql_metric_names,
)

from fusedserve.server.cli import parse_size

ADAPTER_VALUES = KUBERNETES / "prometheus-adapter" / "values.yaml"
CUSTOM_RESOURCE_KINDS = {"ServiceMonitor"}  # Prometheus Operator CRD: no schema ships with Kubernetes


@pytest.mark.parametrize("path", kubernetes_manifests(), ids=lambda path: path.name)
def test_manifest_matches_the_kubernetes_schema(path: Path) -> None:
    for document in load_yaml_documents(path):
        if document["kind"] in CUSTOM_RESOURCE_KINDS:
            continue
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_the_schema_check_rejects_a_misspelled_field() -> None:
    deployment = copy.deepcopy(manifest_of_kind("Deployment"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest_in_the_folder() -> None:
    listed = {path.name for path in kubernetes_manifests()}
    assert listed == {path.name for path in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}


def test_deployment_probes_health_and_sets_resources_and_a_non_root_user() -> None:
    deployment = manifest_of_kind("Deployment")
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    port_names = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/health", "port": "http"}, probe
    assert port_names["http"] == int(_arg(container["args"], "--port"))
    assert {"cpu", "memory"} <= container["resources"]["requests"].keys() <= container["resources"]["limits"].keys()
    # torch threads match the CPU the pod may use; the KV budget fits well inside the memory limit.
    assert _arg(container["args"], "--threads") == container["resources"]["limits"]["cpu"]
    kv_budget = parse_size(_arg(container["args"], "--kv-cache-memory"))
    assert kv_budget <= kubernetes_bytes(container["resources"]["limits"]["memory"]) // 2
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] and security["runAsUser"] == 1000  # the Dockerfile's USER 1000:1000
    assert "USER 1000:1000" in (REPO_ROOT / "Dockerfile").read_text()
    assert "--metrics-no-auth" in container["args"]  # Prometheus scrapes without the API key


def test_service_selects_the_pods_and_exposes_the_named_port() -> None:
    pod_labels = manifest_of_kind("Deployment")["spec"]["template"]["metadata"]["labels"]
    service = manifest_of_kind("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["name"] == "http" and port["targetPort"] == "http"


def test_servicemonitor_scrapes_the_service_metrics_port() -> None:
    monitor = manifest_of_kind("ServiceMonitor")
    service = manifest_of_kind("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    assert all(re.fullmatch(r"\d+s", endpoint[key]) for key in ("interval", "scrapeTimeout"))


def test_hpa_scales_the_deployment_on_the_adapter_served_queue_metric() -> None:
    hpa = manifest_of_kind("HorizontalPodAutoscaler")
    deployment = manifest_of_kind("Deployment")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    (rule,) = load_yaml(ADAPTER_VALUES)["rules"]["custom"]
    assert metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # per-pod values for a Pods metric


def test_adapter_rule_reads_vllm_num_requests_waiting_which_the_server_exports() -> None:
    (rule,) = load_yaml(ADAPTER_VALUES)["rules"]["custom"]
    (series,) = promql_metric_names(rule["seriesQuery"])
    assert series == "vllm:num_requests_waiting" and series in exported_metric_names()
    assert re.search(rule["name"]["matches"], series)
    assert ":" not in rule["name"]["as"]  # custom metrics API names cannot hold ':'
    # The adapter fills the templates in; the result must be a query on the same series.
    query = rule["metricsQuery"].replace("<<.Series>>", series)
    query = query.replace("<<.LabelMatchers>>", 'namespace="default",pod=~"fusedserve-.*"')
    assert promql_metric_names(query.replace("<<.GroupBy>>", "pod")) == {series}


def kubernetes_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity in binary units ('512Mi', '8Gi') as bytes."""
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)", quantity)
    assert match, f"use a binary unit: {quantity}"
    return int(match.group(1)) * 1024 ** ("KMGT".index(match.group(2)[0]) + 1)


def _arg(args: list[str], flag: str) -> str:
    (value,) = [arg.split("=", 1)[1] for arg in args if arg.startswith(flag + "=")]
    return value
