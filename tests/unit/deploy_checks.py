"""Helpers for the deployment tests: the repository's deploy files, and the metric names a PromQL query reads.

The exported names come from a real EngineMetrics registry (never a hand-kept list), so a renamed metric breaks
the dashboard and autoscaler tests at once.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import yaml

from fusedserve.server.metrics import EngineMetrics, exported_sample_names

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "fusedserve.json"
KUBERNETES_VERSION = "1.30"  # the oldest Kubernetes the manifests promise to work on

# Grafana's built-in variables that stand where PromQL needs a duration.
_GRAFANA_DURATIONS = re.compile(r"\$__(rate_interval|interval|range)\b|\$\{__(rate_interval|interval|range)\}")
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<selector>.+?)\s*,\s*[a-zA-Z_][a-zA-Z0-9_]*\s*\)\s*$")


def exported_metric_names() -> set[str]:
    """Every series name /metrics exports, from a fresh EngineMetrics with all label children created."""
    return exported_sample_names(EngineMetrics("any", max_model_len=4096).registry)


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kubernetes_manifests() -> list[Path]:
    """The resources kustomization.yaml applies."""
    kustomization = load_yaml(KUBERNETES / "kustomization.yaml")
    return [KUBERNETES / name for name in kustomization["resources"]]


def manifest_of_kind(kind: str) -> dict[str, Any]:
    (found,) = [doc for path in kubernetes_manifests() for doc in load_yaml_documents(path) if doc["kind"] == kind]
    return found


def _walk(node: Any) -> Iterator[str]:
    if isinstance(node, promql_parser.VectorSelector):
        names = [m.value for m in node.matchers.matchers if m.name == "__name__"]
        yield node.name if node.name else names[0] if names else ""
    elif isinstance(node, promql_parser.MatrixSelector):
        yield from _walk(node.vector_selector)
    elif isinstance(node, promql_parser.AggregateExpr):
        yield from _walk(node.expr)
        if node.param is not None:
            yield from _walk(node.param)
    elif isinstance(node, promql_parser.BinaryExpr):
        yield from _walk(node.lhs)
        yield from _walk(node.rhs)
    elif isinstance(node, promql_parser.Call):
        for arg in node.args:
            yield from _walk(arg)
    elif isinstance(node, promql_parser.ParenExpr | promql_parser.UnaryExpr | promql_parser.SubqueryExpr):
        yield from _walk(node.expr)


def promql_metric_names(query: str) -> set[str]:
    """Metric names a PromQL query (or a Grafana `label_values(selector, label)` query) reads.

    Grafana's duration variables become 5m before parsing; `$var` inside label matcher strings is plain text.
    Raises ValueError for a query that does not parse.
    """
    match = _LABEL_VALUES.match(query)
    if match:
        query = match.group("selector")
    return set(_walk(promql_parser.parse(_GRAFANA_DURATIONS.sub("5m", query))))


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, query) for every panel target and every query variable of a Grafana dashboard."""
    queries: list[tuple[str, str]] = []
    panels = list(dashboard.get("panels", []))
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))  # panels inside collapsed rows
        for target in panel.get("targets", []):
            queries.append((f"panel {panel['title']!r} target {target['refId']}", target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            query = variable["query"]
            queries.append((f"variable {variable['name']!r}", query["query"] if isinstance(query, dict) else query))
    return queries
