"""Turns one step's logits [B, V] into one token per request, following each request's SamplingParams.

Per row: logit_bias -> repetition penalty (prompt + output) -> presence and frequency penalties (output) ->
min_tokens mask -> greedy argmax, or temperature -> min_p, top_k, top_p -> one inverse-CDF draw. Logprobs
come from the raw logits. Work is vectorised over the batch: the bias/penalty/mask edits are sparse index
writes, and argmax, top-k and draws use the block ops of sampler_blocks (no full-row torch argmax, topk or
sort: on a CPU they cost 5-100x more). A min_p/top_k row is decided among its NUM_CANDIDATES best tokens
whenever that is exact; other random rows pay one exp over their row, and a top-p row then sorts only the
weights that can reach its nucleus.
A seeded request draws exactly one uniform per random step from its own generator (`Request.generator`),
so its tokens never depend on the rest of the batch; unseeded requests share the sampler's generator.

It must never leave the caller's logits changed (edits are written in place and undone before returning),
never decide that a request stops (the engine does) and never touch the tokenizer.
"""

from __future__ import annotations

import math
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

    rows: list[int]  # the batch rows that have any edit
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


class _Segments:
    """Id tensors of several rows, concatenated into flat [B*V] indices with one value per row spread over its
    ids (built with three tensor ops, however many rows)."""

    def __init__(self, vocab: int, fields: int) -> None:
        self.vocab = vocab
        self.parts: list[torch.Tensor] = []
        self.offsets: list[int] = []
        self.lengths: list[int] = []
        self.values: list[list[float]] = [[] for _ in range(fields)]

    def add(self, row: int, ids: torch.Tensor, *values: float) -> None:
        self.parts.append(ids)
        self.offsets.append(row * self.vocab)
        self.lengths.append(len(ids))
        for field, value in zip(self.values, values, strict=True):
            field.append(value)

    def flat_ids(self) -> torch.Tensor:
        if not self.parts:
            return torch.empty(0, dtype=torch.long)
        lengths = torch.tensor(self.lengths)
        return torch.cat(self.parts) + torch.tensor(self.offsets).repeat_interleave(lengths)

    def spread(self, field: int) -> torch.Tensor:
        return torch.tensor(self.values[field]).repeat_interleave(torch.tensor(self.lengths, dtype=torch.long))


def _truncates(params: SamplingParams, vocab_size: int) -> bool:
    return 0 < params.top_k < vocab_size or params.top_p < 1.0 or params.min_p > 0.0


def _int64_seed(seed: int) -> int:
    return (seed + 2**63) % 2**64 - 2**63


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
    @torch.inference_mode()  # the model's logits are inference tensors: edits in place need this mode
    def sample(self, logits: torch.Tensor, requests: list[Request]) -> list[SampleResult]:
        if logits.dim() != 2 or logits.shape[0] != len(requests) or logits.shape[1] != self.vocab_size:
            expected = f"{len(requests)} requests x vocab {self.vocab_size}"
            raise ValueError(f"logits {tuple(logits.shape)} do not match {expected}")
        raw = logits.float().contiguous()
        flat = raw.view(-1)
        edits = self._plan_edits(requests)
        touched = edits.touched if edits else torch.empty(0, dtype=torch.long)
        saved = flat[touched]
        try:
            if edits:
                self._apply_edits(flat, edits)
            xb = to_blocks(raw)
            block_max = xb.amax(-1)
            dead = torch.isneginf(block_max.amax(-1)) if edits else None
            if dead is not None and bool(dead.any()):
                # Edits masked every id of some row: that row falls back to its raw logits.
                undo = dead[touched // self.vocab_size]
                flat[touched[undo]] = saved[undo]
                xb = to_blocks(raw)
                block_max = xb.amax(-1)
            tokens = self._choose(xb, block_max, requests)
        finally:
            flat[touched] = saved
        results = [SampleResult(token_id) for token_id in tokens.tolist()]
        wanted = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        if wanted:
            stale = set(edits.rows) if edits else set()
            logprobs = self._logprobs(raw, block_max, stale, wanted, requests, tokens)
            for i, entry in zip(wanted, logprobs, strict=True):
                results[i].logprobs = entry
        return results

    def edited_logits(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """A copy of logits with logit_bias, penalties and the min_tokens mask applied: what temperature and
        truncation then see (for inspection and tests; sample() does the same without copying)."""
        with torch.inference_mode():
            x = logits.float().clone(memory_format=torch.contiguous_format)
            edits = self._plan_edits(requests)
            if edits:
                self._apply_edits(x.view(-1), edits)
        return x.clone()  # outside inference mode: an ordinary tensor

    def _choose(self, xb: torch.Tensor, block_max: torch.Tensor, requests: list[Request]) -> torch.Tensor:
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
        repeat, penalty = _Segments(vocab, 1), _Segments(vocab, 2)
        bias_at: list[int] = []
        bias: list[float] = []
        mask_at: list[int] = []
        rows: list[int] = []
        for i, request in enumerate(requests):
            params = request.params
            penalised = bool(params.presence_penalty or params.frequency_penalty) and bool(request.output_token_ids)
            masked = request.num_output_tokens < params.min_tokens
            if not (params.logit_bias or params.repetition_penalty != 1.0 or penalised or masked):
                continue
            rows.append(i)
            for token, value in params.logit_bias.items():
                if 0 <= int(token) < vocab:
                    bias_at.append(int(token) + i * vocab)
                    bias.append(float(value))
            if params.repetition_penalty != 1.0:
                history = self._history(request)
                repeat.add(i, history.prompt_ids, params.repetition_penalty)
                repeat.add(i, history.output_ids[: history.num_output], params.repetition_penalty)
            if penalised:
                history = self._history(request)
                penalty.add(i, history.output_ids[: history.num_output], params.frequency_penalty,
                            params.presence_penalty)
            if masked:
                ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
                mask_at.extend(t + i * vocab for t in ids if 0 <= t < vocab)
        if not rows:
            return None
        return _LogitEdits(
            rows, torch.tensor(bias_at, dtype=torch.long), torch.tensor(bias), repeat.flat_ids(), repeat.spread(0),
            penalty.flat_ids(), penalty.spread(0), penalty.spread(1), torch.tensor(mask_at, dtype=torch.long),
        )

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
        index = torch.tensor(plain + cut)  # plain rows first
        # e = exp((x - max) / T): unnormalised probabilities over the whole row, 1.0 at its best token.
        # Row by row, so that each row's passes stay in cache. A plain row only needs weights proportional
        # to e: exp(x / T) itself when that can neither overflow nor vanish (one pass fewer).
        e = torch.empty(len(index), xb.shape[1], xb.shape[2])
        block_sums = torch.empty(len(index), xb.shape[1])
        shifts, scales = row_max[index].tolist(), inv_temp[index].tolist()
        for m, i in enumerate(rows[index].tolist()):
            if m < len(plain) and abs(shifts[m] * scales[m]) < 60.0 and scales[m] == 1.0:
                torch.exp(xb[i], out=e[m])
            elif m < len(plain) and abs(shifts[m] * scales[m]) < 60.0:
                torch.mul(xb[i], scales[m], out=e[m]).exp_()
            else:
                torch.sub(xb[i], shifts[m], out=e[m])
                if scales[m] != 1.0:
                    e[m].mul_(scales[m])
                e[m].exp_()
            torch.sum(e[m], -1, out=block_sums[m])
        if plain:
            at = torch.arange(len(plain))
            tokens[index[at]] = blocked_inverse_cdf(e, block_sums, at, u[index[at]])
        if cut:
            flat_e = e.view(e.shape[0], -1)
            mass = block_sums[len(plain):].sum(-1).tolist()
            draws = []
            for m, n in enumerate(cut):
                p = params[n]
                top_k = p.top_k if p.top_k < self.vocab_size else 0
                values = flat_e[len(plain) + m].numpy()
                draws.append(draw_truncated_row(values, mass[m], top_k, p.min_p, p.top_p, float(u[n])))
            tokens[torch.tensor(cut)] = torch.tensor(draws)
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
        self,
        raw: torch.Tensor,
        block_max: torch.Tensor,
        stale: set[int],
        rows: list[int],
        requests: list[Request],
        tokens: torch.Tensor,
    ) -> list[TokenLogprobs]:
        """Chosen token and top-n alternatives from log_softmax of the raw logits (before any edits).
        block_max is reused for rows without edits; rows in `stale` had edits and are measured again."""
        index = torch.tensor(rows)
        xb = to_blocks(raw)
        maxima = block_max[index]
        for n, i in enumerate(rows):
            if i in stale:
                maxima[n] = xb[i].amax(-1)
        row_max = maxima.amax(-1).tolist()
        scratch = torch.empty(raw.shape[1])
        lse = [m + math.log(float(torch.sub(raw[i], m, out=scratch).exp_().sum()))
               for i, m in zip(rows, row_max, strict=True)]
        top_n = min(max(requests[i].params.logprobs or 0 for i in rows), raw.shape[1])
        top_values: list[list[float]] = [[] for _ in rows]
        top_ids: list[list[int]] = [[] for _ in rows]
        if top_n > 0:
            values, ids = block_topk(xb, maxima, index, top_n)
            top_values, top_ids = values.tolist(), ids.tolist()
        chosen = raw[index, tokens[index]].tolist()
        out = []
        for n, i in enumerate(rows):
            k = requests[i].params.logprobs or 0
            top = [(t, v - lse[n]) for t, v in zip(top_ids[n][:k], top_values[n][:k], strict=True)]
            out.append(TokenLogprobs(token_id=int(tokens[i]), logprob=chosen[n] - lse[n], top=top))
        return out
