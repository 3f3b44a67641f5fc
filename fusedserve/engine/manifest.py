"""The `fusedserve.json` manifest of a model folder: which techniques were applied, with what parameters.

Each technique writes its own top-level key ("gstack", "adaptivocab", "larosa"); the engine reads them to switch
on the runtime side of each. A plain Hugging Face folder has no manifest and serves as is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MANIFEST_FILE = "fusedserve.json"


def read_manifest(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / MANIFEST_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def update_manifest(model_dir: Path, technique: str, entry: dict[str, Any], base: dict[str, Any] | None = None) -> None:
    """Set one technique's entry, keeping the others (`base`: the manifest of the folder this one came from)."""
    manifest = dict(base) if base is not None else read_manifest(model_dir)
    manifest[technique] = entry
    (Path(model_dir) / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
