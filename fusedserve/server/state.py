"""What the HTTP layer holds: the server's own settings and the engine it talks to.

`EngineClient` names exactly the part of AsyncEngine the routes use, so the server depends on that surface and
nothing deeper. The app keeps one `ServerState` in app.state.server.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import REGISTRY, CollectorRegistry
from starlette.requests import Request

from fusedserve.engine.async_engine import GenerationChunk
from fusedserve.engine.sampling_params import SamplingParams
from fusedserve.engine.tokenizer import Tokenizer
from fusedserve.server.config import ServerConfig
from fusedserve.server.errors import model_not_found


class EngineClient(Protocol):
    tokenizer: Tokenizer
    model_name: str
    manifest: dict[str, Any]

    @property
    def max_model_len(self) -> int: ...

    @property
    def healthy(self) -> bool: ...

    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[GenerationChunk]: ...

    def stats(self) -> dict[str, Any]: ...


@dataclass
class ServerState:
    engine: EngineClient
    config: ServerConfig
    metrics_registry: CollectorRegistry | None = None  # None: prometheus-client's default registry
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def registry(self) -> CollectorRegistry:
        return self.metrics_registry if self.metrics_registry is not None else REGISTRY

    @property
    def model_name(self) -> str:
        """The name responses report: the first served name."""
        return self.config.served_model_names[0]

    def check_model(self, model: str | None) -> None:
        """A request may omit `model`; if it names one, it must be one we serve (404 otherwise)."""
        if model is not None and model not in self.config.served_model_names:
            raise model_not_found(model)


def server_state(request: Request) -> ServerState:
    return request.app.state.server
