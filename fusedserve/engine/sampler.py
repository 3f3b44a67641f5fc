"""Turns one step's logits [B, V] into one token per request, following each request's SamplingParams.

Per row: logit_bias -> repetition penalty (prompt + output) -> presence and frequency penalties (output) ->
min_tokens mask -> greedy argmax, or temperature -> min_p, top_k, top_p -> one inverse-CDF draw. Logprobs
come from the raw logits. Work is vectorised over the batch: the bias/penalty/mask edits are sparse index
writes, and argmax, top-k and draws use the block ops of sampler_blocks. A min_p/top_k/top_p row is decided
among its NUM_CANDIDATES best tokens whenever that is exact, so only temperature-only and top-p rows pay for
an exp over the whole vocabulary.
A seeded request draws exactly one uniform per random step from its own generator (`Request.generator`),
so its tokens never depend on the rest of the batch; unseeded requests share the sampler's generator.

It must never leave the caller's logits changed (edits are written in place and undone before returning),
never decide that a request stops (the engine does) and never touch the tokenizer.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fusedserve.engine.request import Request, TokenLogprobs
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

NUM_CANDIDATES = 64  # best tokens examined per truncated row; top_k <= this never needs the whole row


@dataclass
class SampleResult:
    token_id: int
    logprobs: TokenLogprobs | None = None


@dataclass
class _TokenHistory:
    """One request's ids as tensors, kept between steps so the prompt is converted once, not every step."""

    prompt_len: int
    prompt_ids: torch.Tensor  # unique prompt ids, int64
    output_ids: torch.Tensor  # int64 buffer; the first num_output entries are valid
    num_output: int


@dataclass
class _LogitEdits:
    """Sparse writes into the flat [B*V] logits, in application order; `touched` holds every index written."""

    bias_at: torch.Tensor
    bias: torch.Tensor
    repeat_at: torch.Tensor
    repeat_by: torch.Tensor
    penalty_at: torch.Tensor
    frequency: torch.Tensor
    presence: torch.Tensor
    mask_at: torch.Tensor

    @property
    def touched(self) -> torch.Tensor:
        return torch.cat([self.bias_at, self.repeat_at, self.penalty_at, self.mask_at])


def _truncates(params: SamplingParams, vocab_size: int) -> bool:
    return 0 < params.top_k < vocab_size or params.top_p < 1.0 or params.min_p > 0.0


def _int64_seed(seed: int) -> int:
    return (seed + 2**63) % 2**64 - 2**63


def _longs(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(values) if values else torch.empty(0, dtype=torch.long)


def _floats(values: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(values) if values else torch.empty(0)


class Sampler:
    """Owns the generator of unseeded requests, a scratch count buffer and the per-request id tensors."""

    def __init__(self, vocab_size: int, eos_token_ids: Iterable[int] = (), seed: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(set(eos_token_ids))
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(_int64_seed(seed))
        self._histories: dict[int, _TokenHistory] = {}  # id(request) -> its ids; dropped when it is collected
        self._counts = torch.zeros(0)  # scratch [B*V] for output-token counts, all zero between calls

    # -- the step ------------------------------------------------------------------------------------------
    def sample(self, logits: torch.Tensor, requests: list[Request]) -> list[SampleResult]:
        if logits.dim() != 2 or logits.shape[0] != len(requests) or logits.shape[1] != self.vocab_size:
            expected = f"{len(requests)} requests x vocab {self.vocab_size}"
            raise ValueError(f"logits {tuple(logits.shape)} do not match {expected}")
        raw = logits.float().contiguous()
        flat = raw.view(-1)
        edits = self._plan_edits(requests)
        saved = flat[edits.touched] if edits else None
        try:
            if edits:
                self._apply_edits(flat, edits)
            tokens = self._choose(raw, requests, edits, saved)
        finally:
            if edits:
                flat[edits.touched] = saved
        results = [SampleResult(token_id) for token_id in tokens.tolist()]
        wanted = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        if wanted:
            for i, logprobs in zip(wanted, self._logprobs(raw, wanted, requests, tokens), strict=True):
                results[i].logprobs = logprobs
        return results

    def _choose(self, x: torch.Tensor, requests: list[Request], edits: _LogitEdits | None,
                saved: torch.Tensor | None) -> torch.Tensor:
        xb = to_blocks(x)
        block_max = xb.amax(-1)
        if edits is not None and saved is not None:
            dead = torch.isneginf(block_max.amax(-1))
            if bool(dead.any()):  # edits masked every id of a row: that row falls back to its raw logits
                touched = edits.touched
                undo = dead[touched // x.shape[1]]
                x.view(-1)[touched[undo]] = saved[undo]
                xb = to_blocks(x)
                block_max = xb.amax(-1)
        greedy = [i for i, r in enumerate(requests) if r.params.greedy]
        if len(greedy) == len(requests):
            return block_argmax(xb, block_max, torch.arange(len(requests)))
        tokens = torch.empty(len(requests), dtype=torch.long)
        if greedy:
            rows = torch.tensor(greedy)
            tokens[rows] = block_argmax(xb, block_max[rows], rows)
        randoms = torch.tensor([i for i, r in enumerate(requests) if not r.params.greedy])
        tokens[randoms] = self._sample_random(xb, block_max[randoms], randoms, requests)
        return tokens

    # -- logits edits: bias, penalties, min_tokens -----------------------------------------------------------
    def _plan_edits(self, requests: list[Request]) -> _LogitEdits | None:
        vocab = self.vocab_size
        bias_at, bias, repeat_at, repeat_by, penalty_at, frequency, presence, mask_at = ([] for _ in range(8))
        for i, request in enumerate(requests):
            params = request.params
            if params.logit_bias:
                items = [(int(t), float(b)) for t, b in params.logit_bias.items() if 0 <= int(t) < vocab]
                bias_at.append(torch.tensor([t + i * vocab for t, _ in items], dtype=torch.long))
                bias.append(torch.tensor([b for _, b in items]))
            if params.repetition_penalty != 1.0:
                history = self._history(request)
                seen = torch.cat([history.prompt_ids, history.output_ids[: history.num_output]])
                repeat_at.append(seen + i * vocab)
                repeat_by.append(torch.full((len(seen),), params.repetition_penalty))
            if (params.presence_penalty or params.frequency_penalty) and request.output_token_ids:
                history = self._history(request)
                penalty_at.append(history.output_ids[: history.num_output] + i * vocab)
                frequency.append(torch.full((history.num_output,), params.frequency_penalty))
                presence.append(torch.full((history.num_output,), params.presence_penalty))
            if request.num_output_tokens < params.min_tokens:
                ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
                mask_at.append(torch.tensor([t + i * vocab for t in ids if 0 <= t < vocab], dtype=torch.long))
        if not (bias_at or repeat_at or penalty_at or mask_at):
            return None
        return _LogitEdits(_longs(bias_at), _floats(bias), _longs(repeat_at), _floats(repeat_by),
                           _longs(penalty_at), _floats(frequency), _floats(presence), _longs(mask_at))

    def _apply_edits(self, flat: torch.Tensor, edits: _LogitEdits) -> None:
        if len(edits.bias_at):
            flat.index_add_(0, edits.bias_at, edits.bias)
        if len(edits.repeat_at):
            # HF/vLLM: a seen id's positive logit is divided by the penalty, a negative one multiplied.
            # Duplicate ids write the same value, so they need no dedup.
            values = flat[edits.repeat_at]
            by = edits.repeat_by
            flat[edits.repeat_at] = torch.where(values > 0, values / by, values * by)
        if len(edits.penalty_at):
            # OpenAI, over output tokens: logit -= count * frequency_penalty + (count > 0) * presence_penalty.
            at = edits.penalty_at
            if self._counts.numel() < flat.numel():
                self._counts = torch.zeros(flat.numel())
            self._counts.index_add_(0, at, torch.ones(len(at)))
            counts = self._counts[at]
            self._counts[at] = 0.0
            flat[at] = flat[at] - counts * edits.frequency - edits.presence
        if len(edits.mask_at):
            flat[edits.mask_at] = float("-inf")

    def _history(self, request: Request) -> _TokenHistory:
        """The request's ids as tensors; only the tokens appended since the last step are converted."""
        key = id(request)
        history = self._histories.get(key)
        if history is None or history.prompt_len != request.num_prompt_tokens or (
            history.num_output > request.num_output_tokens
        ):
            prompt = torch.tensor(request.prompt_token_ids, dtype=torch.long).unique()
            if history is None:
                weakref.finalize(request, self._histories.pop, key, None)
            history = _TokenHistory(request.num_prompt_tokens, prompt, torch.empty(64, dtype=torch.long), 0)
            self._histories[key] = history
        new = request.output_token_ids[history.num_output:]
        if new:
            needed = history.num_output + len(new)
            if needed > len(history.output_ids):
                grown = torch.empty(max(needed, 2 * len(history.output_ids)), dtype=torch.long)
                grown[: history.num_output] = history.output_ids[: history.num_output]
                history.output_ids = grown
            history.output_ids[history.num_output: needed] = torch.tensor(new, dtype=torch.long)
            history.num_output = needed
        return history

    # -- random sampling -----------------------------------------------------------------------------------
    def _uniforms(self, requests: list[Request]) -> torch.Tensor:
        """One uniform per request: from its own generator when seeded, else from the sampler's."""
        u = torch.empty(len(requests), dtype=torch.float64)
        shared = [n for n, r in enumerate(requests) if r.params.seed is None]
        if shared:
            u[shared] = torch.rand(len(shared), generator=self._generator, dtype=torch.float64)
        for n, request in enumerate(requests):
            if request.params.seed is not None:
                if request.generator is None:
                    request.generator = torch.Generator().manual_seed(_int64_seed(request.params.seed))
                u[n] = torch.rand(1, generator=request.generator, dtype=torch.float64)
        return u

    def _sample_random(
        self, xb: torch.Tensor, block_max: torch.Tensor, rows: torch.Tensor, requests: list[Request]
    ) -> torch.Tensor:
        """Temperature, min_p, top_k, top_p and one draw for each xb[rows] (block_max is theirs)."""
        params = [requests[i].params for i in rows.tolist()]
        u = self._uniforms([requests[i] for i in rows.tolist()])
        row_max = block_max.amax(-1)
        inv_temp = torch.tensor([1.0 / p.temperature for p in params])
        tokens = torch.empty(len(rows), dtype=torch.long)
        # Rows whose survivors can lie among their best tokens try those first (no exp over the row).
        narrow = [n for n, p in enumerate(params) if 0 < p.top_k <= NUM_CANDIDATES or p.min_p > 0.0]
        done: set[int] = set()
        if narrow:
            done.update(self._draw_among_candidates(xb, block_max, rows, narrow, params, row_max, inv_temp, u,
                                                    tokens))
        plain = [n for n, p in enumerate(params) if not _truncates(p, self.vocab_size)]
        cut = [n for n, p in enumerate(params) if _truncates(p, self.vocab_size) and n not in done]
        if not (plain or cut):
            return tokens
        index = torch.tensor(plain + cut)  # plain rows first, so e[: len(plain)] is a slice
        # e = exp((x - max) / T): unnormalised probabilities over the whole row, 1.0 at its best token.
        shift = row_max[index][:, None, None]
        e = xb[rows[index]].sub_(shift) if len(index) < xb.shape[0] else xb - shift
        if bool((inv_temp[index] != 1.0).any()):
            e.mul_(inv_temp[index][:, None, None])
        e.exp_()
        if plain:
            block_sums = e[: len(plain)].sum(-1)
            at = torch.arange(len(plain))
            tokens[index[at]] = blocked_inverse_cdf(e, block_sums, at, u[index[at]])
        flat_e = e.view(e.shape[0], -1)
        for m, n in enumerate(cut, start=len(plain)):
            p = params[n]
            top_k = p.top_k if p.top_k < self.vocab_size else 0
            tokens[n] = draw_truncated_row(flat_e[m].numpy(), top_k, p.min_p, p.top_p, float(u[n]))
        return tokens

    def _draw_among_candidates(
        self,
        xb: torch.Tensor,
        block_max: torch.Tensor,
        rows: torch.Tensor,
        narrow: list[int],
        params: list[SamplingParams],
        row_max: torch.Tensor,
        inv_temp: torch.Tensor,
        u: torch.Tensor,
        tokens: torch.Tensor,
    ) -> list[int]:
        """Draw for the narrow rows whose min_p/top_k survivors all lie among their NUM_CANDIDATES best
        tokens (exact then); returns those rows. The others need the whole row."""
        at = torch.tensor(narrow)
        _, cand_ids = block_topk(xb, block_max[at], rows[at], NUM_CANDIDATES)
        cand_x = xb.view(xb.shape[0], -1)[rows[at][:, None], cand_ids]
        cand = cand_x.sub_(row_max[at][:, None]).mul_(inv_temp[at][:, None]).exp_().double()  # descending
        keep_from = torch.tensor([params[n].min_p for n in narrow], dtype=torch.float64)
        k = torch.tensor([params[n].top_k if params[n].top_k < self.vocab_size else 0 for n in narrow])
        kth = cand.gather(1, (k - 1).clamp(0, cand.shape[1] - 1)[:, None]).squeeze(1)
        keep_from = torch.where((k > 0) & (k <= cand.shape[1]), torch.maximum(keep_from, kth), keep_from)
        # Survivors are e >= keep_from; if the last candidate is below that, nothing outside survives.
        contained = (cand[:, -1] < keep_from) | (cand.shape[1] == xb.shape[1] * xb.shape[2])
        if not bool(contained.any()):
            return []
        top_p = torch.tensor([params[n].top_p for n in narrow], dtype=torch.float64)
        weights = nucleus_weights(cand[contained], keep_from[contained], top_p[contained])
        chosen = inverse_cdf(weights, u[at[contained]])
        tokens[at[contained]] = cand_ids[contained].gather(1, chosen[:, None]).squeeze(1)
        return at[contained].tolist()

    # -- logprobs ------------------------------------------------------------------------------------------
    def _logprobs(
        self, raw: torch.Tensor, rows: list[int], requests: list[Request], tokens: torch.Tensor
    ) -> list[TokenLogprobs]:
        """Chosen token and top-n alternatives from log_softmax of the raw logits (before any edits)."""
        index = torch.tensor(rows)
        xb = to_blocks(raw[index] if len(rows) < raw.shape[0] else raw.clone())
        block_max = xb.amax(-1)
        top_n = min(max(requests[i].params.logprobs or 0 for i in rows), raw.shape[1])
        top_values: list[list[float]] = [[] for _ in rows]
        top_ids: list[list[int]] = [[] for _ in rows]
        if top_n > 0:
            values, ids = block_topk(xb, block_max, torch.arange(len(rows)), top_n)
            top_values, top_ids = values.tolist(), ids.tolist()
        row_max = block_max.amax(-1)
        lse = (row_max + xb.sub_(row_max[:, None, None]).exp_().sum((-1, -2)).log_()).tolist()
        chosen = raw[index, tokens[index]].tolist()
        out = []
        for n, i in enumerate(rows):
            k = requests[i].params.logprobs or 0
            top = [(t, v - lse[n]) for t, v in zip(top_ids[n][:k], top_values[n][:k], strict=True)]
            out.append(TokenLogprobs(token_id=int(tokens[i]), logprob=chosen[n] - lse[n], top=top))
        return out
