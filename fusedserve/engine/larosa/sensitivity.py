"""How much each sparsified linear's top-k hurts, per layer and sparsity: the data behind the greedy allocation.

For every layer l, module kind m (qkv, o, gate_up, down) and sparsity s on a grid (0, 0.05, ..., 0.95), the error
is the relative squared error of the next layer's input — layer l's output residual stream after RMSNorm without
a scale, which is what the next layer's linears see in a norm-folded LaRoSA model — when only module m of layer
l keeps the top (1 - s) of its inputs per token and everything else runs dense. Layers are replayed one at a time
on their recorded dense inputs (the real decoder layer, wrapped in a one-layer LlamaModel whose "embedding" is the
recorded input), so a module's cost includes what attention and the MLP do to its error.
Local errors compare well within a layer but not quite across layers (an error in the last layer reaches the
logits directly), so a second pass weighs each layer by its end-to-end effect: the KL divergence of the model's
next-token distribution when that whole layer runs at a reference sparsity, divided by the layer's local error
at the same levels. Measured on SmolLM2-135M (LaRoSA, 50%): the ratio is 1.3-2.5 in layers 0-27 and 2.9 / 4.0 in
the last two. Progress shows with tqdm; a partial table lets an interrupted run resume per layer. This module
never writes weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from fusedserve.engine.larosa.sparsity import (
    MAX_MODULE_SPARSITY,
    SPARSE_MODULES,
    ModuleShape,
    SparsityPlan,
    allocate_greedy,
    kept_channels,
    module_shapes,
    plan_sparsity,
)
from fusedserve.engine.model.llama import LlamaModel
from fusedserve.engine.model.loader import load_llama
from fusedserve.kernels.attention import SlotBatch
from fusedserve.kernels.linear import DenseLinear
from fusedserve.kernels.sparse_linear import topk_mask

SENSITIVITY_FILE = "larosa_sensitivity.json"
GRID_STEP = 0.05
REFERENCE_SPARSITY = 0.5  # the fixed-ratio plan at which each layer's end-to-end weight is measured
METRIC = "relative squared error of the next layer's normalised input, one module sparsified at a time"


def sparsity_grid(step: float = GRID_STEP) -> list[float]:
    """0, step, 2 step, ... up to MAX_MODULE_SPARSITY."""
    return [round(i * step, 10) for i in range(int(MAX_MODULE_SPARSITY / step + 1e-9) + 1)]


@dataclass(frozen=True)
class SensitivityTable:
    """errors[l][kind][i]: the local error of layer l's `kind` at sparsity grid[i] (0 at grid[0] = 0);
    layer_weights[l]: end-to-end KL per unit of local error in layer l (all 1.0 where not measured)."""

    grid: list[float]
    errors: list[dict[str, list[float]]]
    tokens: int
    layer_weights: list[float] | None = None
    metric: str = METRIC

    def weighted_errors(self) -> list[dict[str, list[float]]]:
        """What the greedy allocation minimises: each layer's local errors times its weight."""
        weights = self.layer_weights or [1.0] * len(self.errors)
        return [
            {kind: [w * e for e in curve] for kind, curve in layer.items()}
            for w, layer in zip(weights, self.errors, strict=True)
        ]

    def greedy_plan(self, shapes: dict[str, ModuleShape], target: float) -> SparsityPlan:
        return allocate_greedy(shapes, self.grid, self.weighted_errors(), target)

    def to_json(self) -> dict[str, Any]:
        return {
            "grid": self.grid,
            "errors": self.errors,
            "tokens": self.tokens,
            "layer_weights": self.layer_weights,
            "metric": self.metric,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SensitivityTable:
        weights = data.get("layer_weights")
        return cls(
            [float(s) for s in data["grid"]],
            data["errors"],
            int(data["tokens"]),
            None if weights is None else [float(w) for w in weights],
            data.get("metric", METRIC),
        )

    def save(self, folder: Path) -> Path:
        path = Path(folder) / SENSITIVITY_FILE
        path.write_text(json.dumps(self.to_json()))
        return path

    @classmethod
    def load(cls, folder: Path) -> SensitivityTable | None:
        path = Path(folder) / SENSITIVITY_FILE
        return cls.from_json(json.loads(path.read_text())) if path.exists() else None


class ProbeLinear:
    """An exact fp32 linear that top-k masks its input when `k` is set and remembers its last output."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.inner = DenseLinear(weight, bias, bf16_min_rows=None)
        self.out_features, self.in_features = weight.shape
        self.k: int | None = None
        self.last_output: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.last_output = self.inner(x if self.k is None else topk_mask(x, self.k))
        return self.last_output


def probe_factory(name: str, weight: torch.Tensor, bias: torch.Tensor | None) -> ProbeLinear:
    return ProbeLinear(weight, bias)


class LayerReplay:
    """Runs one decoder layer of `model` on recorded residual-stream inputs [T, d] (one window each)."""

    def __init__(self, model: LlamaModel, layer: int, max_len: int) -> None:
        self.layer = model.layers[layer]
        # The replay feeds hidden states, never token ids: a one-row embedding table only fixes dtype and device.
        unused_embedding = torch.zeros(1, model.arch.hidden_size, dtype=model.dtype)
        self.model = LlamaModel(model.arch, unused_embedding, [self.layer], None, model.lm_head, max_len)

    def normalised_output(self, hidden: torch.Tensor) -> torch.Tensor:
        """rms_norm(layer(hidden)) without a scale: the next layer's input."""
        n, arch = hidden.shape[0], self.model.arch
        shape = (1, n, arch.num_kv_heads, arch.head_dim)
        self.model.embed_tokens = hidden  # F.embedding(arange(n), hidden) is hidden itself
        keys, values = [torch.zeros(shape, dtype=hidden.dtype)], [torch.zeros(shape, dtype=hidden.dtype)]
        return self.model.forward(torch.arange(n), SlotBatch.build([0], [n], [n]), keys, values)

    def residual_output(self, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's output residual stream for the input of the last dense call (rebuilt as llama.py adds it)."""
        if self.layer.residual_adapter is not None:
            hidden = hidden @ self.layer.residual_adapter
        return hidden + self.layer.o_proj.last_output + self.layer.down_proj.last_output


@torch.inference_mode()
def measure_sensitivity(
    model_dir: Path,
    windows: list[torch.Tensor],
    grid: list[float] | None = None,
    checkpoint: Path | None = None,
    progress: bool = True,
    layer_weights: bool = True,
    identity: str | None = None,
) -> SensitivityTable:
    """The error table of the model in `model_dir` (a LaRoSA folder, or any Llama folder) over `windows`;
    layer_weights=False skips the end-to-end pass (every layer weighs 1). `identity` names the model in the
    checkpoint's fingerprint (default: its path; a caller measuring a temporary folder passes something stable)."""
    from tqdm import tqdm

    grid = grid or sparsity_grid()
    max_len = max(int(w.shape[0]) for w in windows)
    model = load_llama(Path(model_dir), torch.float32, max_positions=max_len, make_linear=probe_factory)
    tokens = int(sum(w.numel() for w in windows))
    fingerprint = json.dumps(
        {
            "model": identity or str(Path(model_dir).resolve()),
            "tokens": tokens,
            "grid": grid,
            "first_ids": windows[0][:16].tolist(),
        }
    )
    saved: dict[str, Any] = {"fingerprint": fingerprint, "errors": [], "layer_kl": []}
    if checkpoint is not None and checkpoint.exists():
        previous = json.loads(checkpoint.read_text())
        if previous["fingerprint"] == fingerprint:
            saved = previous
    steps = len(model.layers) * (2 if layer_weights else 1)
    bar = tqdm(total=steps, disable=not progress, desc="larosa sensitivity", unit="layer")
    hidden = [F.embedding(w, model.embed_tokens) for w in windows]
    for index in range(len(model.layers)):
        replay = LayerReplay(model, index, max_len)
        references, next_hidden = [], []
        for h in hidden:
            references.append(replay.normalised_output(h))
            next_hidden.append(replay.residual_output(h))
        if index >= len(saved["errors"]):
            saved["errors"].append(_layer_errors(replay, hidden, references, grid))
            _save(checkpoint, saved)
        bar.update()
        hidden = next_hidden
    del hidden, next_hidden, references
    errors = saved["errors"]
    weights = None
    if layer_weights:
        reference = plan_sparsity(module_shapes(model.arch), REFERENCE_SPARSITY)
        dense = [_log_probs(model, w) for w in windows]
        bar.update(len(saved["layer_kl"]))
        for index in range(len(saved["layer_kl"]), len(model.layers)):
            saved["layer_kl"].append(_layer_kl(model, index, reference, windows, dense))
            _save(checkpoint, saved)
            bar.update()
        weights = [kl / max(_local_error(errors[i], grid, reference), 1e-12) for i, kl in enumerate(saved["layer_kl"])]
    bar.close()
    return SensitivityTable(grid, errors, tokens, weights)


def _save(checkpoint: Path | None, saved: dict[str, Any]) -> None:
    if checkpoint is not None:
        checkpoint.write_text(json.dumps(saved))


def _log_probs(model: LlamaModel, ids: torch.Tensor) -> torch.Tensor:
    n, arch = ids.shape[0], model.arch
    shape = (1, n, arch.num_kv_heads, arch.head_dim)
    keys = [torch.zeros(shape, dtype=model.dtype) for _ in model.layers]
    values = [torch.zeros(shape, dtype=model.dtype) for _ in model.layers]
    hidden = model.forward(ids, SlotBatch.build([0], [n], [n]), keys, values)
    return F.log_softmax(model.compute_logits(hidden), dim=-1)


def _layer_kl(
    model: LlamaModel, index: int, plan: SparsityPlan, windows: list[torch.Tensor], dense: list[torch.Tensor]
) -> float:
    """Mean KL(dense || sparse) per token with only layer `index` sparsified as `plan` says."""
    probes: list[ProbeLinear] = [getattr(model.layers[index], kind) for kind in SPARSE_MODULES]
    for kind, probe in zip(SPARSE_MODULES, probes, strict=True):
        probe.k = plan.kept(kind, probe.in_features)
    total = 0.0
    for ids, reference in zip(windows, dense, strict=True):
        total += float((reference.exp() * (reference - _log_probs(model, ids))).sum())
    for probe in probes:
        probe.k = None
    return total / sum(int(w.numel()) for w in windows)


def _local_error(layer: dict[str, list[float]], grid: list[float], plan: SparsityPlan) -> float:
    """The layer's summed local error at the plan's levels (linear between grid points)."""
    return sum(_interpolate(grid, curve, plan.sparsity(kind)) for kind, curve in layer.items())


def _interpolate(grid: list[float], curve: list[float], s: float) -> float:
    for j in range(1, len(grid)):
        if s <= grid[j]:
            t = (s - grid[j - 1]) / (grid[j] - grid[j - 1])
            return (1 - t) * curve[j - 1] + t * curve[j]
    return curve[-1]


def _layer_errors(
    replay: LayerReplay, hidden: list[torch.Tensor], references: list[torch.Tensor], grid: list[float]
) -> dict[str, list[float]]:
    scale = sum(float(ref.double().pow(2).sum()) for ref in references)
    result: dict[str, list[float]] = {}
    for kind in SPARSE_MODULES:
        probe: ProbeLinear = getattr(replay.layer, kind)
        curve = [0.0]
        for s in grid[1:]:
            probe.k = kept_channels(s, probe.in_features)
            squared = sum(
                float((replay.normalised_output(h) - ref).double().pow(2).sum())
                for h, ref in zip(hidden, references, strict=True)
            )
            curve.append(squared / scale)
        probe.k = None
        result[kind] = curve
    return result
