"""LaRoSA calibration: from a dense Llama folder to a rotated, norm-folded folder that serves top-k sparse.

Steps: run the dense model (our LlamaModel, fp32) over a few tens of thousands of tokens of real text; for each
layer accumulate, in float64, the uncentred covariance H_l = sum x^T x of the normalised, scale-free attention
input x = h / rms(h); take Q_l = eigenvectors of H_l + damping * mean(diag H_l) * I; absorb the rotations
(absorb.py); for the greedy allocation, measure on the rotated weights how much each (layer, module) suffers from
top-k (sensitivity.py) and allocate the per-layer levels from that; write the folder, its sensitivity table and its
manifest entry "larosa" (sparsity plan, calibration record). Progress shows with tqdm and partial covariance and
sensitivity files let an interrupted run resume. Never modifies the source folder.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from fusedserve.engine.larosa.absorb import absorb_rotations, rotations_from_covariances
from fusedserve.engine.larosa.sensitivity import SENSITIVITY_FILE, measure_sensitivity
from fusedserve.engine.larosa.sparsity import ALLOCATIONS, GREEDY, module_shapes, plan_for_arch
from fusedserve.engine.manifest import MANIFEST_FILE, read_manifest, update_manifest
from fusedserve.engine.model.arch import LlamaArch
from fusedserve.engine.model.llama import LlamaModel
from fusedserve.engine.model.loader import load_llama, read_state_dict
from fusedserve.kernels.attention import SlotBatch
from fusedserve.kernels.linear import DenseLinear, Linear

MANIFEST_KEY = "larosa"
FORMAT_VERSION = 1
CHECKPOINT_EVERY_S = 60.0
HF_NOTE = (
    "RMSNorm scales are folded into the following linears and each layer's residual stream is rotated "
    "(model.layers.N.residual_adapter, applied before layer N). Only fusedserve's loader reproduces this model; "
    "a plain transformers load does not (it would drop the adapters and apply unit norms)."
)


@dataclass(frozen=True)
class CalibrationConfig:
    sparsity: float
    corpus: str | None = None  # a directory of text files; None: the Python documentation
    num_tokens: int = 32768
    seq_len: int = 1024
    damping: float = 0.01
    allocation: str = GREEDY  # "greedy" (per layer, from measured errors) or "fixed-ratio" (one level per kind)
    sensitivity_tokens: int = 1024  # of the calibration text, for the greedy allocation's error table
    sensitivity_seq_len: int = 512


class CovarianceRecorder:
    """Wraps a layer's qkv_proj: accumulates x^T x of its scale-free input in float64, then applies scale and W."""

    def __init__(self, inner: Linear, scale: torch.Tensor | None) -> None:
        self.inner = inner
        self.scale = scale
        self.in_features = inner.in_features
        self.out_features = inner.out_features
        self.covariance = torch.zeros(self.in_features, self.in_features, dtype=torch.float64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x64 = x.double()
        self.covariance += x64.T @ x64
        return self.inner(x if self.scale is None else x * self.scale)


def fp32_dense_factory(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    return DenseLinear(weight, bias, bf16_min_rows=None)  # calibration statistics in full fp32


def attach_recorders(model: LlamaModel) -> list[CovarianceRecorder]:
    """Moves each input norm scale behind a recorder so the recorder sees h / rms(h) exactly."""
    recorders = []
    for layer in model.layers:
        recorder = CovarianceRecorder(layer.qkv_proj, layer.input_norm)
        layer.input_norm = None
        layer.qkv_proj = recorder
        recorders.append(recorder)
    return recorders


def run_window(model: LlamaModel, ids: torch.Tensor) -> None:
    """One forward pass over a window of token ids with a throwaway single-slot KV cache."""
    arch, length = model.arch, ids.shape[0]
    shape = (1, length, arch.num_kv_heads, arch.head_dim)
    keys = [torch.zeros(shape, dtype=model.dtype) for _ in model.layers]
    values = [torch.zeros(shape, dtype=model.dtype) for _ in model.layers]
    model.forward(ids, SlotBatch.build([0], [length], [length]), keys, values)


def collect_covariances(
    model_dir: Path, windows: list[torch.Tensor], checkpoint: Path | None = None, progress: bool = True
) -> list[torch.Tensor]:
    """Per-layer H_l over all windows; resumes from and updates `checkpoint` (deleted by the caller when done)."""
    from tqdm import tqdm

    seq_len = max(int(w.shape[0]) for w in windows)
    model = load_llama(model_dir, torch.float32, max_positions=seq_len, make_linear=fp32_dense_factory)
    recorders = attach_recorders(model)
    fingerprint = {
        "model": str(Path(model_dir).resolve()),
        "windows": len(windows),
        "seq_len": seq_len,
        "first_ids": windows[0][:16].tolist(),
    }
    done = 0
    if checkpoint is not None and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        if saved["fingerprint"] == json.dumps(fingerprint):
            done = int(saved["windows_done"])
            for recorder, h in zip(recorders, saved["covariances"], strict=True):
                recorder.covariance = h
    last_save = time.monotonic()
    for index in tqdm(
        range(done, len(windows)),
        initial=done,
        total=len(windows),
        disable=not progress,
        desc="larosa calibrate",
        unit="window",
    ):
        run_window(model, windows[index])
        done_all = index + 1 == len(windows)
        if checkpoint is not None and (done_all or time.monotonic() - last_save > CHECKPOINT_EVERY_S):
            _save_checkpoint(checkpoint, fingerprint, index + 1, recorders)
            last_save = time.monotonic()
    return [recorder.covariance for recorder in recorders]


def _save_checkpoint(path: Path, fingerprint: dict[str, Any], done: int, recorders: list[CovarianceRecorder]) -> None:
    tmp = path.with_suffix(".tmp")
    payload = {
        "fingerprint": json.dumps(fingerprint),
        "windows_done": done,
        "covariances": [r.covariance for r in recorders],
    }
    torch.save(payload, tmp)
    tmp.replace(path)


def sensitivity_windows(windows: list[torch.Tensor], num_tokens: int, seq_len: int) -> list[torch.Tensor]:
    """The first num_tokens calibration tokens in windows of seq_len (one shorter window if there are fewer)."""
    ids = torch.cat(windows)[:num_tokens]
    seq_len = min(seq_len, ids.numel())
    return list(ids[: (ids.numel() // seq_len) * seq_len].view(-1, seq_len))


def write_larosa_folder(
    model_dir: Path,
    out_dir: Path,
    state: dict[str, torch.Tensor],
    entry: dict[str, Any],
    annotate: Callable[[Path], dict[str, Any]] | None = None,
) -> Path:
    """Write config (untied), weights, the source's tokenizer files and the manifest; atomically replaces out_dir.

    annotate(folder): runs on the written weights before the manifest; its keys are added to the entry."""
    from safetensors.torch import save_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        skip = {"config.json", MANIFEST_FILE, "model.safetensors.index.json"}
        for path in model_dir.iterdir():
            if path.is_file() and path.name not in skip and path.suffix != ".safetensors":
                shutil.copy(path, tmp / path.name)
        config = json.loads((model_dir / "config.json").read_text())
        config["tie_word_embeddings"] = False
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if annotate is not None:
            entry = {**entry, **annotate(tmp)}
        update_manifest(tmp, MANIFEST_KEY, entry, base=read_manifest(model_dir))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def build_larosa_model(
    model_dir: Path,
    out_dir: Path,
    config: CalibrationConfig,
    windows: list[torch.Tensor],
    corpus_name: str,
    progress: bool = True,
) -> Path:
    """Calibrate on `windows`, absorb the rotations, and write the LaRoSA folder with its manifest entry."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if MANIFEST_KEY in read_manifest(model_dir):
        raise ValueError(f"{model_dir} is already a LaRoSA model; calibrate its dense source instead")
    if config.allocation not in ALLOCATIONS:
        raise ValueError(f"unknown allocation {config.allocation!r} ({', '.join(ALLOCATIONS)})")
    arch = LlamaArch.from_model_dir(model_dir)
    plan = plan_for_arch(arch, config.sparsity)  # validates the sparsity before the long run
    checkpoint = out_dir.parent / f".{out_dir.name}.larosa-partial.pt"
    sensitivity_checkpoint = out_dir.parent / f".{out_dir.name}.larosa-sensitivity-partial.json"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    covariances = collect_covariances(model_dir, windows, checkpoint, progress)
    rotations = rotations_from_covariances(covariances, config.damping)
    source = read_state_dict(model_dir)
    state = absorb_rotations(source, arch, rotations, dtype=source["model.embed_tokens.weight"].dtype)
    del source

    def allocate(folder: Path) -> dict[str, Any]:
        """The plan (greedy: from the error table measured on the rotated weights in `folder`)."""
        if config.allocation != GREEDY:
            return {"plan": plan.to_json()}
        probe_windows = sensitivity_windows(windows, config.sensitivity_tokens, config.sensitivity_seq_len)
        identity = f"{model_dir.resolve()} -> {out_dir.resolve()} {asdict(config)}"
        table = measure_sensitivity(
            folder, probe_windows, checkpoint=sensitivity_checkpoint, progress=progress, identity=identity
        )
        table.save(folder)
        greedy = table.greedy_plan(module_shapes(arch), config.sparsity)
        return {"plan": greedy.to_json(), "sensitivity": SENSITIVITY_FILE}

    entry = {
        "version": FORMAT_VERSION,
        "sparsity": config.sparsity,
        "rotated": True,
        "norms_folded": True,
        "untied_lm_head": True,
        "residual_adapters": "model.layers.N.residual_adapter for N >= 1: h <- h @ A before layer N",
        "calibration": {**asdict(config), "corpus": corpus_name, "tokens": int(sum(w.numel() for w in windows))},
        "base_model": str(model_dir),
        "transformers_loadable": False,
        "note": HF_NOTE,
    }
    write_larosa_folder(model_dir, out_dir, state, entry, annotate=allocate)
    checkpoint.unlink(missing_ok=True)
    sensitivity_checkpoint.unlink(missing_ok=True)
    return out_dir
