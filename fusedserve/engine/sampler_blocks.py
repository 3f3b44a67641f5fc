"""Vocabulary-as-blocks tensor ops behind the sampler: argmax, top-k and inverse-CDF draws over [R, V] rows.

A row of V logits is viewed as V/BLOCK blocks. Argmax and top-k first rank blocks by their maximum and then
look inside the few winners; a draw first picks a block by its sum and then an id inside it. On a CPU this
is 5-30x faster than torch's full-row argmax/topk/cumsum and gives the same answers (argmax and top-k
exactly, draws in distribution). Rare whole-row cases use numpy's partition/sort, which are SIMD-sorted.

These functions are pure: they never modify their inputs unless the name ends in `_`, and they know
nothing of requests or sampling parameters.
"""

from __future__ import annotations

import numpy as np
import torch

BLOCK = 64  # ids per block; most vocabulary sizes are multiples of 64


def to_blocks(x: torch.Tensor) -> torch.Tensor:
    """[R, V] -> [R, V/BLOCK, BLOCK]: a view, or a -inf padded copy when V is not a multiple of BLOCK."""
    pad = -x.shape[1] % BLOCK
    if pad:
        x = torch.nn.functional.pad(x, (0, pad), value=float("-inf"))
    return x.view(x.shape[0], -1, BLOCK)


def block_argmax(xb: torch.Tensor, block_max: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """First index of the maximum of each xb[rows] (argmax's answer); block_max [len(rows), nb] is theirs."""
    block = block_max.argmax(-1)
    return block * BLOCK + xb[rows, block].argmax(-1)


def _top_columns(values: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k largest values, largest first (numpy's SIMD partition and sort)."""
    width = values.shape[1]
    part = (
        np.argpartition(values, width - k, axis=1)[:, width - k :]
        if k < width
        else np.tile(np.arange(width), (values.shape[0], 1))
    )
    order = np.argsort(-np.take_along_axis(values, part, 1), axis=1)
    return np.take_along_axis(part, order, 1)


def block_topk(
    xb: torch.Tensor, block_max: torch.Tensor, rows: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k values (descending) and ids of each xb[rows]. Only the k blocks with the largest maxima can
    hold a value above the k-th largest, so the selection sees k*BLOCK gathered values instead of the row."""
    nb = xb.shape[1]
    k = min(k, nb * BLOCK)
    blocks = torch.from_numpy(_top_columns(block_max.numpy(), min(k, nb)))
    gathered = xb[rows[:, None], blocks].reshape(len(rows), -1)
    pos = torch.from_numpy(_top_columns(gathered.numpy(), k))
    return gathered.gather(1, pos), blocks.gather(1, pos // BLOCK) * BLOCK + pos % BLOCK


def _draw_target(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """u * row total, kept strictly below the total so a strict search never runs off the end."""
    total = cdf[:, -1]
    return torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn from each row of non-negative weights [R, N] with uniforms u [R] in [0, 1). A zero weight
    is never picked: the search is strict (right=True) and the target stays below the row total."""
    cdf = weights.double().cumsum(-1)
    pos = torch.searchsorted(cdf, _draw_target(cdf, u)[:, None], right=True).squeeze(1)
    return pos.clamp_(max=weights.shape[1] - 1)


def blocked_inverse_cdf(e: torch.Tensor, block_sums: torch.Tensor, rows: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn from each whole row e[rows] of weights [R, nb, BLOCK] (block_sums = e.sum(-1)): a block by
    its sum, then an id inside that block. A full-row cumsum's distribution at a fraction of its cost."""
    sums = block_sums[rows].double()
    cdf = sums.cumsum(-1)
    target = _draw_target(cdf, u)
    block = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp_(max=e.shape[1] - 1)
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)[:, None]).squeeze(1), 0.0)
    u_inside = ((target - before) / sums.gather(1, block[:, None]).squeeze(1)).clamp_(0.0, 1.0)
    return block * BLOCK + inverse_cdf(e[rows, block], u_inside)


def nucleus_weights(candidates: torch.Tensor, keep_from: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Weights to draw from among each row's best tokens, candidates [R, C] (float64, descending), when every
    survivor (candidate >= keep_from: min_p and top_k) is a candidate. The nucleus keeps a survivor while the
    survivor mass strictly before it is below top_p of the survivors' total (vLLM/HF top-p), and every tie of
    the last one kept (as draw_truncated_row and the C++ kernel do)."""
    survivors = candidates * (candidates >= keep_from[:, None])
    inclusive = survivors.cumsum(-1)
    reached = inclusive >= top_p[:, None] * inclusive[:, -1:]
    reached[:, -1] = True  # rounding can leave the whole mass a hair below top_p of itself
    threshold = survivors.gather(1, reached.to(torch.uint8).argmax(-1, keepdim=True))  # the first to reach it
    return survivors * ((survivors >= threshold) | (top_p[:, None] >= 1.0))


def draw_truncated_row(values: np.ndarray, mass: float, top_k: int, min_p: float, top_p: float, u: float) -> int:
    """One draw from a whole row of weights (float32, largest 1.0, summing to mass) under min_p, top_k (0: off)
    and top_p, with u in [0, 1). Survivors are weights >= max(min_p, k-th largest); the nucleus is the
    shortest run of largest survivors whose mass reaches top_p of theirs, plus ties of its smallest weight.
    Weights below (1 - top_p) * mass / len sum to less than (1 - top_p) * mass, so they are never in the
    nucleus: only the rest is sorted (numpy's SIMD sort, values only)."""
    n = len(values)
    keep_from = min_p
    if 0 < top_k < n:
        keep_from = max(keep_from, float(np.partition(values, n - top_k)[n - top_k]))
    if top_p < 1.0:
        if keep_from > 0:
            mass = float(values[values >= keep_from].sum())
        ids = np.flatnonzero(values >= max(keep_from, (1.0 - top_p) * mass / n))
        heavy = values[ids]
        ordered = np.sort(heavy)[::-1]
        inclusive = np.cumsum(ordered.astype(np.float64))
        keep_from = float(ordered[min(int(np.searchsorted(inclusive, top_p * mass)), len(ordered) - 1)])
        ids = ids[heavy >= keep_from]
    else:
        ids = np.flatnonzero(values >= keep_from)
    if len(ids) == 0:  # only for out-of-range parameters (min_p > 1)
        return int(np.argmax(values))
    inclusive = np.cumsum(values[ids].astype(np.float64))
    total = inclusive[-1]
    target = min(u * total, float(np.nextafter(total, 0.0)))
    return int(ids[min(int(np.searchsorted(inclusive, target, side="right")), len(ids) - 1)])
