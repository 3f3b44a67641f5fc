"""Turns one step's logits [B, V] into one token per request, following each request's SamplingParams.

Per row: logit_bias -> repetition penalty (prompt + output) -> presence and frequency penalties (output) ->
min_tokens mask -> greedy argmax, or temperature -> min_p, top_k, top_p -> one inverse-CDF draw. Logprobs
come from the raw logits. The bias/penalty/mask edits are sparse index writes, vectorised over the batch;
the choice itself is one call for the whole batch (sampler_rows: the C++ kernel, or its pure-torch twin).
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
from fusedserve.engine.sampler_blocks import block_topk, to_blocks
from fusedserve.engine.sampler_rows import RowParams, choose_tokens, load_sampler_kernel


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


def _int64_seed(seed: int) -> int:
    return (seed + 2**63) % 2**64 - 2**63


class Sampler:
    """Owns the generator of unseeded requests, a scratch count buffer, the per-request id tensors and the
    compiled row kernel (None: the pure-torch path)."""

    def __init__(
        self, vocab_size: int, eos_token_ids: Iterable[int] = (), seed: int | None = None, use_kernel: bool = True
    ) -> None:
        """use_kernel=False keeps the pure-torch path even where the C++ kernel builds (benchmarks, tests)."""
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(set(eos_token_ids))
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(_int64_seed(seed))
        self._histories: dict[int, _TokenHistory] = {}  # id(request) -> its ids; dropped when it is collected
        self._counts = torch.zeros(0)  # scratch [B*V] for output-token counts, all zero between calls
        self._kernel = load_sampler_kernel() if use_kernel else None

    @property
    def uses_kernel(self) -> bool:
        return self._kernel is not None

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
        rows = self._row_params(requests)
        try:
            if edits:
                self._apply_edits(flat, edits)
            tokens = choose_tokens(raw, rows, self._kernel)
            dead = tokens < 0
            if edits and bool(dead.any()):
                # Edits masked every id of some row: that row falls back to its raw logits, same uniform.
                undo = dead[touched // self.vocab_size]
                flat[touched[undo]] = saved[undo]
                tokens = choose_tokens(raw, rows, self._kernel)
        finally:
            flat[touched] = saved
        tokens.clamp_(min=0)  # a row of raw -inf logits: argmax's answer
        results = [SampleResult(token_id) for token_id in tokens.tolist()]
        wanted = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
        if wanted:
            for i, entry in zip(wanted, self._logprobs(raw, wanted, requests, tokens), strict=True):
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

    def _row_params(self, requests: list[Request]) -> RowParams:
        """Each row's settings, with one uniform per random row (greedy rows draw none)."""
        uniform = torch.zeros(len(requests), dtype=torch.float64)
        random = [i for i, r in enumerate(requests) if not r.params.greedy]
        if random:
            uniform[random] = self._uniforms([requests[i] for i in random])
        return RowParams.build([r.params for r in requests], uniform, self.vocab_size)

    # -- logits edits: bias, penalties, min_tokens -----------------------------------------------------------
    def _plan_edits(self, requests: list[Request]) -> _LogitEdits | None:
        vocab = self.vocab_size
        repeat, penalty = _Segments(vocab, 1), _Segments(vocab, 2)
        bias_at: list[int] = []
        bias: list[float] = []
        mask_at: list[int] = []
        edited = False
        for i, request in enumerate(requests):
            params = request.params
            penalised = bool(params.presence_penalty or params.frequency_penalty) and bool(request.output_token_ids)
            masked = request.num_output_tokens < params.min_tokens
            if not (params.logit_bias or params.repetition_penalty != 1.0 or penalised or masked):
                continue
            edited = True
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
                penalty.add(
                    i, history.output_ids[: history.num_output], params.frequency_penalty, params.presence_penalty
                )
            if masked:
                ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
                mask_at.extend(t + i * vocab for t in ids if 0 <= t < vocab)
        if not edited:
            return None
        return _LogitEdits(
            torch.tensor(bias_at, dtype=torch.long),
            torch.tensor(bias),
            repeat.flat_ids(),
            repeat.spread(0),
            penalty.flat_ids(),
            penalty.spread(0),
            penalty.spread(1),
            torch.tensor(mask_at, dtype=torch.long),
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
        if (
            history is None
            or history.prompt_len != request.num_prompt_tokens
            or (history.num_output > request.num_output_tokens)
        ):
            prompt = torch.tensor(request.prompt_token_ids, dtype=torch.long).unique()
            if history is None:
                weakref.finalize(request, self._histories.pop, key, None)
            history = _TokenHistory(request.num_prompt_tokens, prompt, torch.empty(64, dtype=torch.long), 0)
            self._histories[key] = history
        new = request.output_token_ids[history.num_output :]
        if new:
            needed = history.num_output + len(new)
            if needed > len(history.output_ids):
                grown = torch.empty(max(needed, 2 * len(history.output_ids)), dtype=torch.long)
                grown[: history.num_output] = history.output_ids[: history.num_output]
                history.output_ids = grown
            history.output_ids[history.num_output : needed] = torch.tensor(new, dtype=torch.long)
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

    # -- logprobs ------------------------------------------------------------------------------------------
    def _logprobs(
        self, raw: torch.Tensor, rows: list[int], requests: list[Request], tokens: torch.Tensor
    ) -> list[TokenLogprobs]:
        """Chosen token and top-n alternatives from log_softmax of the raw logits (before any edits)."""
        index = torch.tensor(rows)
        xb = to_blocks(raw)
        maxima = torch.stack([xb[i].amax(-1) for i in rows])  # row by row: xb[index] would copy the rows
        row_max = maxima.amax(-1).tolist()
        scratch = torch.empty(raw.shape[1])
        lse = [
            m + math.log(float(torch.sub(raw[i], m, out=scratch).exp_().sum()))
            for i, m in zip(rows, row_max, strict=True)
        ]
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
