"""schemathesis against the server's own /openapi.json: no generated request to an OpenAI route gets a 5xx.

The schemathesis CLI runs its coverage phase (boundary and just-out-of-range values of every field, wrong
types, missing and extra fields) and its fuzzing phase (schema-valid and schema-violating bodies) against the
real default model, with a fixed seed so CI repeats the same cases. Every case must be answered below 500, every
4xx must be OpenAI error JSON, and no body may carry a traceback. The recorded interactions (its NDJSON report)
are counted: at least MIN_CASES requests must have been sent.

Generation stays fast because --max-model-len is small (64): schema-valid requests without max_tokens (chat fills
the context) generate at most ~34 tokens after the chat template, and large max_tokens are a 400. Nothing caps
max_tokens behind the API's back. --max-num-seqs 128 lets an n=128 request run as one batch.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from tests.conftest import Launcher, RunningServer

pytestmark = pytest.mark.slow

MIN_CASES = 500
SEED = 20261121
OPENAI_ROUTES = r"^/(v1/|tokenize$|detokenize$)"
SERVER_FLAGS = ("--threads", "1", "--max-model-len", "64", "--max-num-seqs", "128", "--disable-access-log")
ERROR_FIELDS = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def fuzz_server(server_launcher: Launcher) -> Iterator[RunningServer]:
    with server_launcher(*SERVER_FLAGS) as server:
        yield server


def run_schemathesis(server: RunningServer, report_dir: Path) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable, "-m", "schemathesis.cli", "run", f"{server.base_url}/openapi.json",
        "--checks", "not_a_server_error",
        "--phases", "examples,coverage,fuzzing",
        "--include-path-regex", OPENAI_ROUTES,
        "--max-examples", "25",
        "--seed", str(SEED), "--generation-deterministic",
        "--workers", "4",
        "--request-timeout", "300",
        "--report", "ndjson", "--report-dir", str(report_dir),
        "--no-color",
    ]  # fmt: skip
    return subprocess.run(command, cwd=report_dir, capture_output=True, text=True, timeout=1800)


def recorded_interactions(report_dir: Path) -> list[tuple[str, str, dict[str, Any]]]:
    """(phase, operation label, response) of every request the run sent, from its NDJSON report."""
    (report,) = report_dir.glob("*.ndjson")
    interactions = []
    for line in report.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if finished is None:
            continue
        recorder = finished["recorder"]
        for interaction in (recorder.get("interactions") or {}).values():
            if interaction.get("response") is not None:
                interactions.append((finished["phase"], recorder["label"], interaction["response"]))
    return interactions


def response_text(response: dict[str, Any]) -> str:
    content = response.get("content") or {}
    return base64.b64decode(content["$base64"]).decode("utf-8", "replace") if "$base64" in content else ""


def is_openai_error(text: str) -> bool:
    try:
        body = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(body, dict) and set(body) == {"error"} and set(body["error"]) == ERROR_FIELDS


def test_no_generated_case_gets_a_server_error(fuzz_server: RunningServer, tmp_path: Path) -> None:
    result = run_schemathesis(fuzz_server, tmp_path)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    interactions = recorded_interactions(tmp_path)
    statuses = Counter((label, response["status_code"]) for _, label, response in interactions)
    phases = Counter(phase for phase, _, _ in interactions)
    print(f"schemathesis: {len(interactions)} cases by phase {dict(phases)}")
    for (label, status), count in sorted(statuses.items()):
        print(f"  {label:32} {status}  {count}")
    assert len(interactions) >= MIN_CASES
    assert not [key for key in statuses if key[1] >= 500]
    for _, label, response in interactions:
        text = response_text(response)
        assert "Traceback" not in text, (label, text[:500])
        if 400 <= response["status_code"] < 500:
            assert is_openai_error(text), (label, response["status_code"], text[:500])
