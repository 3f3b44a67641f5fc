"""Initial embeddings for the recycled ids (AdaptiVocab's exponential initialisation).

Input and output embeddings are untied first (the LM head becomes its own copy). A new token t =
(t_0..t_{k-1}) gets input row sum_i w_i E[t_i] with w_i proportional to exp(+2i) (the last piece weighs most:
it is what the model has just read), and LM-head row sum_i v_i H[t_i] with v_i proportional to exp(-2i) (the
first piece weighs most: it is what the model predicts next). Rows are computed from frozen copies; kept rows
are unchanged.
"""

from __future__ import annotations

import torch

EMBED_KEY = "model.embed_tokens.weight"
LM_HEAD_KEY = "lm_head.weight"


def exponential_weights(num_pieces: int, sign: float) -> torch.Tensor:
    """w_i = exp(sign * 2i) / sum_j exp(sign * 2j), in float64 for exactness."""
    logits = sign * 2.0 * torch.arange(num_pieces, dtype=torch.float64)
    return torch.softmax(logits, dim=0)


def weighted_rows(table: torch.Tensor, pieces: tuple[int, ...], sign: float) -> torch.Tensor:
    weights = exponential_weights(len(pieces), sign)
    rows = table[list(pieces)].to(torch.float64)
    return (weights[:, None] * rows).sum(dim=0).to(table.dtype)


def init_patched_embeddings(
    embed: torch.Tensor, lm_head: torch.Tensor | None, new_tokens: dict[int, tuple[int, ...]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """New (input embedding, LM head) tables; lm_head None means tied (the head is the input table)."""
    frozen_embed = embed.detach().clone()
    frozen_head = (lm_head if lm_head is not None else embed).detach().clone()
    new_embed = frozen_embed.clone()
    new_head = frozen_head.clone()
    for token_id, pieces in new_tokens.items():
        new_embed[token_id] = weighted_rows(frozen_embed, pieces, +1.0)
        new_head[token_id] = weighted_rows(frozen_head, pieces, -1.0)
    return new_embed, new_head


def patch_state_dict(
    state: dict[str, torch.Tensor], new_tokens: dict[int, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """A copy of a Llama state dict with untied, initialised embedding and LM-head tables."""
    out = dict(state)
    embed, head = init_patched_embeddings(state[EMBED_KEY], state.get(LM_HEAD_KEY), new_tokens)
    out[EMBED_KEY] = embed.contiguous()
    out[LM_HEAD_KEY] = head.contiguous()
    return out
