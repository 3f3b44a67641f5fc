"""The HTTP server's own settings, built from CLI flags in server/cli.py next to EngineConfig.

Kept free of heavy imports: `fusedserve --help` imports this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field

DEFAULT_MAX_REQUEST_BYTES = 8 * 1024 * 1024


@dataclass
class ServerConfig:
    served_model_names: list[str]
    model_root: str | None = None  # the model folder, shown as `root` in /v1/models
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    metrics_no_auth: bool = False
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    request_timeout: float | None = None  # seconds per request; None: no limit
    allowed_origins: list[str] = field(default_factory=list)  # empty: CORS off
    allowed_methods: list[str] = field(default_factory=lambda: ["*"])
    allowed_headers: list[str] = field(default_factory=lambda: ["*"])
