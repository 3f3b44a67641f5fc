"""`fusedserve serve`: flags like `vllm serve`, turned into EngineConfig and ServerConfig in this one place.

The process owns one engine (its thread runs inside this process) and one uvicorn worker. On SIGTERM or
SIGINT uvicorn stops accepting connections, lets in-flight requests finish for up to
--shutdown-grace-seconds, cancels the rest (which aborts their engine requests); then the engine shuts down
and the process exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fusedserve.engine.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from fusedserve.server.config import DEFAULT_MAX_REQUEST_BYTES, ServerConfig

logger = logging.getLogger("fusedserve.server")

DEFAULT_MAX_MODEL_LEN_CAP = 8192
API_KEY_ENV = "FUSEDSERVE_API_KEY"

_SIZE_UNITS = {"": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": 1024**2}
_SIZE_UNITS |= {"g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def parse_size(text: str) -> int:
    """'1048576', '512MiB', '2GB' -> bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if match is None or match.group(2).lower() not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 1048576, 512MiB, 2GB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API")
    add_serve_arguments(parser)
    parser.set_defaults(handler=serve)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_argument_group("model")
    model.add_argument("--model", type=Path, default=None, help="model folder (default: SmolLM2-135M)")
    model.add_argument("--served-model-name", nargs="+", default=None, help="names clients may use")
    model.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default=None,
        help="default auto: on the CPU fp32 weights with bf16 compute (fp32 for large steps without AMX) and a "
        "bf16 KV cache; on CUDA bfloat16. float32 is exact fp32 everywhere",
    )
    model.add_argument(
        "--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when torch sees a GPU"
    )
    model.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")

    engine = parser.add_argument_group("engine")
    engine.add_argument("--max-num-seqs", type=int, default=32)
    engine.add_argument("--max-model-len", type=int, default=None, help="default: model's, at most 8192")
    engine.add_argument("--max-num-batched-tokens", type=int, default=2048)
    engine.add_argument("--max-waiting", type=int, default=None, help="waiting-queue bound; beyond it 429")
    engine.add_argument(
        "--preset",
        choices=["baseline", "vattention", "adaptivocab", "larosa", "fused"],
        default=None,
        help="technique combination: picks the prepared model folder and KV backend (see `fusedserve prepare`); "
        "--model and --kv-backend given explicitly win",
    )
    engine.add_argument("--kv-backend", choices=["static", "vattention"], default=None, help="default: vattention")
    engine.add_argument("--kv-page-size", type=parse_size, default=CacheConfig.kv_page_size)
    engine.add_argument("--kv-cache-memory", type=parse_size, default=None, help="physical KV budget")

    http = parser.add_argument_group("http")
    http.add_argument("--host", default="0.0.0.0")
    http.add_argument("--port", type=int, default=8000)
    http.add_argument(
        "--api-key", nargs="+", action="extend", default=None, help=f"accepted keys (or ${API_KEY_ENV})"
    )
    http.add_argument("--metrics-no-auth", action="store_true", help="serve /metrics without a key")
    http.add_argument("--allowed-origins", nargs="+", default=[], help="CORS origins (default: CORS off)")
    http.add_argument("--allowed-methods", nargs="+", default=["*"])
    http.add_argument("--allowed-headers", nargs="+", default=["*"])
    http.add_argument("--max-request-bytes", type=parse_size, default=DEFAULT_MAX_REQUEST_BYTES)
    http.add_argument("--request-timeout", type=float, default=None, help="seconds per request")
    http.add_argument("--shutdown-grace-seconds", type=float, default=20.0)
    levels = ["critical", "error", "warning", "info", "debug"]
    http.add_argument("--log-level", default="info", choices=levels)
    http.add_argument("--disable-access-log", action="store_true")


def apply_preset(args: argparse.Namespace) -> None:
    """Fill --model and --kv-backend from --preset where the user did not give them."""
    if args.preset is not None:
        from fusedserve.presets import PRESETS, preset_model_dir

        preset = PRESETS[args.preset]
        if args.model is None:
            args.model = preset_model_dir(preset)
        if args.kv_backend is None:
            args.kv_backend = preset.kv_backend
    if args.kv_backend is None:
        args.kv_backend = CacheConfig.kv_backend


def resolve_model_dir(args: argparse.Namespace) -> Path:
    if args.model is not None:
        return Path(args.model).expanduser().resolve()
    from fusedserve.engine.model.default_model import ensure_default_model

    # A first run converts the GGUF with torch; on a thread of its own, whose OpenMP team ends with it, so the
    # engine thread stays the process's only one (see AsyncEngine._run_engine).
    with ThreadPoolExecutor(1) as converter:
        return converter.submit(ensure_default_model).result()


def default_max_model_len(model_dir: Path) -> int:
    from fusedserve.engine.model.arch import LlamaArch

    return min(LlamaArch.from_model_dir(model_dir).max_position_embeddings, DEFAULT_MAX_MODEL_LEN_CAP)


def served_model_names(args: argparse.Namespace, model_dir: Path) -> list[str]:
    if args.served_model_name:
        return list(args.served_model_name)
    if args.model is None:
        from fusedserve.engine.model.default_model import DEFAULT_MODEL_NAME

        return [DEFAULT_MODEL_NAME]
    return [model_dir.name]


def build_engine_config(args: argparse.Namespace, model_dir: Path, model_name: str) -> EngineConfig:
    from fusedserve.engine.device import resolve_device, resolve_dtype

    device = resolve_device(args.device)
    model = ModelConfig(model_dir, model_name, dtype=resolve_dtype(args.dtype, device), device=str(device))
    return EngineConfig(
        model=model,
        cache=CacheConfig(
            kv_backend=args.kv_backend, kv_cache_memory=args.kv_cache_memory, kv_page_size=args.kv_page_size
        ),
        scheduler=SchedulerConfig(
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len or default_max_model_len(model_dir),
            max_num_batched_tokens=args.max_num_batched_tokens,
            max_waiting=args.max_waiting,
        ),
        threads=args.threads,
    )


def api_keys(args: argparse.Namespace) -> list[str]:
    keys = list(args.api_key or [])
    keys += [key.strip() for key in os.environ.get(API_KEY_ENV, "").split(",") if key.strip()]
    return keys


def build_server_config(args: argparse.Namespace, model_dir: Path, names: list[str]) -> ServerConfig:
    return ServerConfig(
        served_model_names=names,
        model_root=str(model_dir),
        api_keys=api_keys(args),
        metrics_no_auth=args.metrics_no_auth,
        max_request_bytes=args.max_request_bytes,
        request_timeout=args.request_timeout,
        allowed_origins=args.allowed_origins,
        allowed_methods=args.allowed_methods,
        allowed_headers=args.allowed_headers,
    )


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from fusedserve.engine.async_engine import AsyncEngine
    from fusedserve.engine.device import DeviceUnavailableError, resolve_device
    from fusedserve.server.app import create_app
    from fusedserve.server.metrics import EngineMetrics

    log_format = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=args.log_level.upper(), format=log_format)
    try:
        logger.info("device: %s", resolve_device(args.device))  # fail fast, before loading anything
    except DeviceUnavailableError as error:
        logger.error("%s", error)
        return 2
    try:
        apply_preset(args)
    except FileNotFoundError as error:
        logger.error("%s", error)
        return 2
    model_dir = resolve_model_dir(args)
    names = served_model_names(args, model_dir)
    engine_config = build_engine_config(args, model_dir, names[0])
    server_config = build_server_config(args, model_dir, names)
    logger.info("loading %s from %s", names[0], model_dir)
    metrics = EngineMetrics.for_model(model_dir, names[0], engine_config.scheduler.max_model_len)
    engine = AsyncEngine.from_config(engine_config, observer=metrics)
    try:
        app = create_app(engine, server_config, metrics.registry)
        uvicorn_config = uvicorn.Config(
            app,
            host=args.host,
            port=args.port,
            workers=1,
            log_level=args.log_level,
            access_log=not args.disable_access_log,
            timeout_graceful_shutdown=args.shutdown_grace_seconds,
        )
        _absorb_reraised_exit_signals()
        uvicorn.Server(uvicorn_config).run()
    finally:
        engine.shutdown()
    logger.info("server stopped")
    return 0


def _absorb_reraised_exit_signals() -> None:
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown with the handler it found; make that
    handler a no-op so the process can shut the engine down and exit 0 instead of dying by the signal."""

    def note(signum: int, frame: object) -> None:
        logger.info("received %s; shutting down", signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, note)
    signal.signal(signal.SIGINT, note)
