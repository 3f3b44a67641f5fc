"""Reading a Hugging Face model folder's weights and writing an adapted copy of it.

An adapted folder keeps every non-weight file of its source (the ORIGINAL tokenizer files, chat template,
generation config), gets config.json with untied embeddings, one model.safetensors, and the patch file. The
folder is written in a temporary sibling and renamed into place, so a crash never leaves half a model. This
module knows nothing of the vocabulary algorithm.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
REGENERATED = {"config.json", "model.safetensors.index.json", "fusedserve.json"}


def load_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's safetensors files (one file or shards)."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        state.update(load_file(str(path)))
    return state


def read_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def write_model_folder(
    source: Path,
    out: Path,
    state: dict[str, torch.Tensor],
    config_updates: dict,
    write_extra: Callable[[Path], None],
) -> None:
    """Copy source's non-weight files to out with new weights and config; write_extra adds more files."""
    from safetensors.torch import save_file

    source, out = Path(source), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for path in sorted(source.iterdir()):
            if path.is_file() and path.name not in REGENERATED and not path.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(path, tmp / path.name)
        config = read_config(source)
        config.update(config_updates)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tensors = {k: v.detach().contiguous() for k, v in state.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_extra(tmp)
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
