"""A server with API keys (flags and FUSEDSERVE_API_KEY), open /metrics, CORS for one origin, a time limit."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import openai
import pytest

if TYPE_CHECKING:
    from tests.conftest import Launcher, RunningServer

pytestmark = pytest.mark.slow

MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "Tell me a long story."}]
TIMEOUT_S = 3
ALLOWED_ORIGIN = "https://app.example"
LONG = {"model": MODEL, "messages": MESSAGES, "max_tokens": 900, "ignore_eos": True}


@pytest.fixture(scope="module")
def guarded_server(server_launcher: Launcher) -> Iterator[RunningServer]:
    flags = (
        "--max-model-len", "1024", "--api-key", "key-one", "key-two", "--metrics-no-auth",
        "--request-timeout", str(TIMEOUT_S), "--allowed-origins", ALLOWED_ORIGIN, "--disable-access-log",
    )  # fmt: skip
    with server_launcher(*flags, api_key="key-one", env={"FUSEDSERVE_API_KEY": "key-env"}) as server:
        yield server


def get_models(server: RunningServer, authorization: str | None) -> httpx.Response:
    headers = {"Authorization": authorization} if authorization is not None else {}
    return httpx.get(f"{server.base_url}/v1/models", headers=headers)


@pytest.mark.parametrize("key", ["key-one", "key-two", "key-env"])
def test_every_configured_key_is_accepted(guarded_server: RunningServer, key: str) -> None:
    assert get_models(guarded_server, f"Bearer {key}").status_code == 200


@pytest.mark.parametrize("authorization", [None, "", "Bearer", "Bearer wrong", "Basic key-one", "key-one"])
def test_missing_or_wrong_key_is_401(guarded_server: RunningServer, authorization: str | None) -> None:
    response = get_models(guarded_server, authorization)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
        ("POST", "/tokenize"),
        ("GET", "/version"),
    ],
)
def test_routes_other_than_health_need_a_key(guarded_server: RunningServer, method: str, path: str) -> None:
    assert httpx.request(method, f"{guarded_server.base_url}{path}", json={}).status_code == 401


def test_health_and_metrics_are_open(guarded_server: RunningServer) -> None:
    assert httpx.get(f"{guarded_server.base_url}/health").status_code == 200
    assert httpx.get(f"{guarded_server.base_url}/metrics").status_code == 200


def test_sdk_with_wrong_key_raises_authentication_error(guarded_server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{guarded_server.base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_sdk_with_right_key_chats(guarded_server: RunningServer) -> None:
    response = guarded_server.openai().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert response.choices[0].message.content is not None


def test_request_over_the_time_limit_is_408(guarded_server: RunningServer) -> None:
    response = guarded_server.http().post("/v1/chat/completions", json=LONG)
    assert response.status_code == 408
    assert response.json()["error"]["code"] == "request_timeout"


def test_stream_over_the_time_limit_ends_with_an_error_event(guarded_server: RunningServer) -> None:
    stream = guarded_server.openai().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=900, stream=True, extra_body={"ignore_eos": True}
    )
    received = 0
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            received += 1
    assert received > 1  # the error came mid-stream, after content
    assert info.value.body["code"] == "request_timeout"


def test_error_event_is_followed_by_done(guarded_server: RunningServer) -> None:
    with guarded_server.http().stream(
        "POST", "/v1/chat/completions", json={**LONG, "stream": True}
    ) as response:
        events = [line for line in response.iter_lines() if line]
    assert '"error"' in events[-2] and events[-1] == "data: [DONE]"


def preflight(server: RunningServer, origin: str) -> httpx.Response:
    headers = {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    return httpx.options(f"{server.base_url}/v1/chat/completions", headers=headers)


def test_cors_preflight_from_allowed_origin_needs_no_key(guarded_server: RunningServer) -> None:
    response = preflight(guarded_server, ALLOWED_ORIGIN)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN


def test_cors_preflight_from_other_origin_is_refused(guarded_server: RunningServer) -> None:
    response = preflight(guarded_server, "https://evil.example")
    assert "access-control-allow-origin" not in response.headers


def test_cors_headers_on_an_authorized_response(guarded_server: RunningServer) -> None:
    headers = {**guarded_server.headers(), "Origin": ALLOWED_ORIGIN}
    response = httpx.get(f"{guarded_server.base_url}/v1/models", headers=headers)
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
