"""Write and check recognisable K/V contents in a KV cache slot, for the vAttention tests (per layer: +v / -v)."""

from __future__ import annotations

from fusedserve.engine.kv_cache import KVCache


def fill_slot(cache: KVCache, slot: int, length: int, value: float) -> None:
    for layer in range(len(cache.key_cache)):
        cache.key_cache[layer][slot, :length] = value + layer
        cache.value_cache[layer][slot, :length] = -(value + layer)


def slot_holds(cache: KVCache, slot: int, length: int, value: float) -> bool:
    return all(
        bool((cache.key_cache[layer][slot, :length] == value + layer).all())
        and bool((cache.value_cache[layer][slot, :length] == -(value + layer)).all())
        for layer in range(len(cache.key_cache))
    )
