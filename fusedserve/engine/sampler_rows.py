"""One token per row of a step's edited logits [B, V], given each row's temperature, truncation and uniform.

Two implementations of one rule: the C++ kernel (fusedserve/kernels/cpu/sampler.cpp, one call for the batch,
rows in parallel) and the pure-torch path below, used where the kernel cannot be built (no compiler, or
FUSEDSERVE_NO_CPP_KERNELS=1). Given the same uniforms they choose the same tokens (up to float rounding at a
boundary). The rule: a greedy row takes its first argmax; a random row weighs e = exp((x - max) / T) in
float32, keeps the survivors e >= max(min_p, k-th largest e), then the top-p nucleus (every survivor >= the
weight at which their running mass, largest first, reaches top_p of their total: ties stay in), and draws
in vocabulary order, summing in float64, the first id whose running mass exceeds u * total.
A row with no finite logit gets -1 (the sampler decides what that means).

It never modifies the logits and never draws a random number: the uniforms come in with the rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from fusedserve.engine.sampler_blocks import (
    block_argmax,
    block_topk,
    blocked_inverse_cdf,
    draw_truncated_row,
    inverse_cdf,
    nucleus_weights,
    to_blocks,
)
from fusedserve.engine.sampling_params import SamplingParams
from fusedserve.kernels.cpu.extensions import load_cpp_extension

KERNEL_SOURCE = "sampler.cpp"
NUM_CANDIDATES = 64  # best tokens the torch path examines per min_p/top_k row before it reads the whole row


@dataclass
class RowParams:
    """Each row's settings as [B] tensors: the kernel's arguments."""

    inv_temp: torch.Tensor  # float32, 1 / temperature; 0 marks a greedy row
    top_k: torch.Tensor  # int64, 0 when off
    top_p: torch.Tensor  # float64, 1.0 when off
    min_p: torch.Tensor  # float64, 0.0 when off
    uniform: torch.Tensor  # float64 in [0, 1); unused by greedy rows

    @classmethod
    def build(cls, params: list[SamplingParams], uniform: torch.Tensor, vocab_size: int) -> RowParams:
        return cls(
            torch.tensor([0.0 if p.greedy else 1.0 / p.temperature for p in params], dtype=torch.float32),
            torch.tensor([p.top_k if 0 < p.top_k < vocab_size else 0 for p in params], dtype=torch.long),
            torch.tensor([p.top_p for p in params], dtype=torch.float64),
            torch.tensor([p.min_p for p in params], dtype=torch.float64),
            uniform,
        )


def load_sampler_kernel() -> ModuleType | None:
    """The compiled kernel (sample_rows), or None where it cannot be had: callers then use the torch path."""
    return load_cpp_extension(KERNEL_SOURCE)


def choose_tokens(logits: torch.Tensor, rows: RowParams, kernel: ModuleType | None) -> torch.Tensor:
    """Tokens [B] (int64) for contiguous float32 logits [B, V]; -1 for a row without a finite logit."""
    if kernel is not None:
        return kernel.sample_rows(logits, rows.inv_temp, rows.top_k, rows.top_p, rows.min_p, rows.uniform)
    return choose_tokens_torch(logits, rows)


# -- the pure-torch path ----------------------------------------------------------------------------------------
def choose_tokens_torch(logits: torch.Tensor, rows: RowParams) -> torch.Tensor:
    """The kernel's rule with the block ops of sampler_blocks (no full-row torch argmax, topk or sort)."""
    xb = to_blocks(logits)
    block_max = xb.amax(-1)
    greedy = rows.inv_temp == 0
    tokens = torch.empty(len(logits), dtype=torch.long)
    if bool(greedy.any()):
        at = greedy.nonzero().flatten()
        tokens[at] = block_argmax(xb, block_max[at], at)
    if not bool(greedy.all()):
        at = (~greedy).nonzero().flatten()
        tokens[at] = _sample_random(xb, block_max[at], at, rows)
    tokens[torch.isneginf(block_max.amax(-1))] = -1
    return tokens


def _sample_random(xb: torch.Tensor, block_max: torch.Tensor, at: torch.Tensor, rows: RowParams) -> torch.Tensor:
    """Temperature, min_p, top_k, top_p and one draw for each xb[at] (block_max is theirs).
    A min_p/top_k row is decided among its NUM_CANDIDATES best tokens whenever that is exact; other rows pay one
    exp over their row, and a top-p row then sorts only the weights that can reach its nucleus."""
    inv_temp, u = rows.inv_temp[at], rows.uniform[at]
    top_k, top_p, min_p = rows.top_k[at].tolist(), rows.top_p[at].tolist(), rows.min_p[at].tolist()
    row_max = block_max.amax(-1)
    tokens = torch.empty(len(at), dtype=torch.long)
    done: set[int] = set()
    narrow = [n for n in range(len(at)) if 0 < top_k[n] <= NUM_CANDIDATES or min_p[n] > 0.0]
    if narrow:
        done.update(_draw_among_candidates(xb, block_max, at, narrow, rows, row_max, tokens))
    truncates = [top_k[n] > 0 or top_p[n] < 1.0 or min_p[n] > 0.0 for n in range(len(at))]
    plain = [n for n in range(len(at)) if not truncates[n]]
    cut = [n for n in range(len(at)) if truncates[n] and n not in done]
    if not (plain or cut):
        return tokens
    index = torch.tensor(plain + cut)  # plain rows first
    # e = exp((x - max) / T): unnormalised probabilities over the whole row, 1.0 at its best token. Row by row,
    # so that each row's passes stay in cache.
    e = torch.empty(len(index), xb.shape[1], xb.shape[2])
    block_sums = torch.empty(len(index), xb.shape[1])
    shifts, scales = row_max[index].tolist(), inv_temp[index].tolist()
    for m, i in enumerate(at[index].tolist()):
        torch.sub(xb[i], shifts[m], out=e[m])
        if scales[m] != 1.0:
            e[m].mul_(scales[m])
        e[m].exp_()
        torch.sum(e[m], -1, out=block_sums[m])
    if plain:
        first = torch.arange(len(plain))
        tokens[index[first]] = blocked_inverse_cdf(e, block_sums, first, u[index[first]])
    if cut:
        flat_e = e.view(e.shape[0], -1)
        mass = block_sums[len(plain) :].double().sum(-1).tolist()
        draws = []
        for m, n in enumerate(cut):
            values = flat_e[len(plain) + m].numpy()
            draws.append(draw_truncated_row(values, mass[m], top_k[n], min_p[n], top_p[n], float(u[n])))
        tokens[torch.tensor(cut)] = torch.tensor(draws)
    return tokens


def _draw_among_candidates(
    xb: torch.Tensor,
    block_max: torch.Tensor,
    at: torch.Tensor,
    narrow: list[int],
    rows: RowParams,
    row_max: torch.Tensor,
    tokens: torch.Tensor,
) -> list[int]:
    """Draw for the narrow rows whose min_p/top_k survivors all lie among their NUM_CANDIDATES best tokens
    (exact then); returns those rows. The others need the whole row."""
    pick = torch.tensor(narrow)
    lines = at[pick]
    _, cand_ids = block_topk(xb, block_max[pick], lines, NUM_CANDIDATES)
    cand_x = xb.view(xb.shape[0], -1)[lines[:, None], cand_ids]
    inv_temp = rows.inv_temp[lines][:, None]
    cand = cand_x.sub_(row_max[pick][:, None]).mul_(inv_temp).exp_().double()  # descending
    keep_from = rows.min_p[lines]
    k = rows.top_k[lines]
    kth = cand.gather(1, (k - 1).clamp(0, cand.shape[1] - 1)[:, None]).squeeze(1)
    keep_from = torch.where((k > 0) & (k <= cand.shape[1]), torch.maximum(keep_from, kth), keep_from)
    # Survivors are e >= keep_from; if the last candidate is below that, nothing outside survives.
    contained = (cand[:, -1] < keep_from) | (cand.shape[1] == xb.shape[1] * xb.shape[2])
    if not bool(contained.any()):
        return []
    weights = nucleus_weights(cand[contained], keep_from[contained], rows.top_p[lines][contained])
    ids, order = cand_ids[contained].sort(-1)  # the draw walks vocabulary order, as the kernel's does
    chosen = inverse_cdf(weights.gather(1, order), rows.uniform[lines][contained])
    tokens[pick[contained]] = ids.gather(1, chosen[:, None]).squeeze(1)
    return pick[contained].tolist()
