"""Engine configuration: one dataclass per component, built from CLI flags in one place (server/cli.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelConfig:
    model_dir: Path
    served_model_name: str
    dtype: str = "auto"  # auto | float32 | bfloat16 (see llm_engine.DTYPES)
    device: str = "cpu"


@dataclass
class CacheConfig:
    kv_backend: str = "vattention"  # static | vattention
    kv_cache_memory: int | None = None  # physical KV budget in bytes (None: the backend's default)
    kv_page_size: int | None = None  # bytes per physical page (vattention); None: the device's measured default


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 32
    max_model_len: int = 8192
    max_num_batched_tokens: int = 2048
    max_waiting: int | None = None  # None: unbounded queue


@dataclass
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    threads: int | None = None  # torch intra-op threads; None: every core this process may use
