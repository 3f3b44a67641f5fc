"""vAttention: demand-paged KV memory behind the engine's virtual KV tensors, and the KV cache factory.

`create_kv_cache` is the one place that turns `CacheConfig` into a KV cache:
- "static": every slot holds max_model_len tokens from the start. Under a byte budget (`kv_cache_memory`) that
  means fewer slots: max_num_seqs is cut to budget // (max_model_len * bytes_per_token) (at least one slot).
- "vattention": all max_num_seqs slots are reserved virtually; the budget caps physical pages. Without a
  budget it is the static reservation, capped at half the memory the device has free (CPU: MemAvailable). A
  `kv_page_size` of None picks the device's measured layout and page size (kv_cache.DEVICE_DEFAULTS: CPU
  per_layer with 32 KiB pages, CUDA all_layers with 2 MiB pages).

This package never schedules and never touches KV data; the engine must not reach into its allocator.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fusedserve.engine.config import CacheConfig
from fusedserve.engine.kv_cache import KVCache, KVCacheSpec, StaticKVCache
from fusedserve.engine.vattention.kv_cache import DEVICE_DEFAULTS, VAttentionKVCache

__all__ = ["DEVICE_DEFAULTS", "VAttentionKVCache", "create_kv_cache", "default_budget_bytes"]


def free_device_memory(device: torch.device) -> int:
    """Bytes free on the device now: MemAvailable on the CPU, cudaMemGetInfo on a GPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def default_budget_bytes(spec: KVCacheSpec, device: torch.device) -> int:
    """vAttention's budget when none is given: the static reservation, at most half the free device memory."""
    return min(VAttentionKVCache.static_bytes(spec), free_device_memory(device) // 2)


def create_kv_cache(spec: KVCacheSpec, cache_config: CacheConfig, device: torch.device | str) -> KVCache:
    device = torch.device(device)
    budget = cache_config.kv_cache_memory
    if cache_config.kv_backend == "static":
        if budget is not None:
            slot_bytes = spec.bytes_per_token * spec.max_model_len
            if budget < slot_bytes:
                raise ValueError(
                    f"kv_cache_memory {budget} bytes cannot hold one static slot of "
                    f"{spec.max_model_len} tokens ({slot_bytes} bytes)"
                )
            spec = replace(spec, max_num_seqs=min(spec.max_num_seqs, budget // slot_bytes))
        return StaticKVCache(spec, device)
    if cache_config.kv_backend == "vattention":
        if budget is None:
            budget = default_budget_bytes(spec, device)
        # kv_page_size None (or 0): the device's measured default page size and layout.
        return VAttentionKVCache(spec, cache_config.kv_page_size or None, budget, device)
    raise ValueError(f"unknown kv_backend {cache_config.kv_backend!r} (static | vattention)")
