"""Read and update `fusedserve.json`, the manifest a model folder carries next to its HF files.

The manifest is one JSON object; each technique owns one key. This module owns two: "gstack" (provenance of a
grown model: base, factor, base_layers, base_tokens, trained_tokens) and "pretrain" (tokens a model trained
from scratch has seen). It never touches keys other techniques own.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MANIFEST_NAME = "fusedserve.json"


@dataclass(frozen=True)
class GstackProvenance:
    base: str
    factor: int
    base_layers: int
    base_tokens: int
    trained_tokens: int


def read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return data


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    path = Path(folder) / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def tokens_seen(manifest: dict[str, Any]) -> int:
    """Pre-training tokens of the model itself: after growth for a grown model, else from scratch."""
    if "gstack" in manifest:
        return int(manifest["gstack"].get("trained_tokens", 0))
    return int(manifest.get("pretrain", {}).get("trained_tokens", 0))


def manifest_for_growth(base_manifest: dict[str, Any], provenance: GstackProvenance) -> dict[str, Any]:
    """The grown folder's manifest: other techniques' keys kept, the base's own training record replaced."""
    manifest = {k: v for k, v in base_manifest.items() if k not in ("gstack", "pretrain")}
    manifest["gstack"] = asdict(provenance)
    return manifest


def manifest_after_training(init_manifest: dict[str, Any], new_tokens: int) -> dict[str, Any]:
    """The manifest after `new_tokens` more pre-training tokens on top of the initial folder's."""
    manifest = json.loads(json.dumps(init_manifest))
    total = tokens_seen(init_manifest) + int(new_tokens)
    if "gstack" in manifest:
        manifest["gstack"]["trained_tokens"] = total
    else:
        manifest["pretrain"] = {"trained_tokens": total}
    return manifest
