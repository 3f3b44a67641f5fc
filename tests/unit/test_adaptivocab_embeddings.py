"""Exponential init: input rows weight the last piece most, LM-head rows the first; kept rows stay."""

from __future__ import annotations

import math

import torch

from fusedserve.engine.adaptivocab.embeddings import (
    EMBED_KEY,
    LM_HEAD_KEY,
    exponential_weights,
    init_patched_embeddings,
    patch_state_dict,
)

torch.set_num_threads(1)


def test_exponential_weights_match_the_paper_for_three_pieces() -> None:
    forward = exponential_weights(3, +1.0)
    assert torch.allclose(forward, torch.tensor([0.0159, 0.1173, 0.8668], dtype=torch.float64), atol=1e-4)
    backward = exponential_weights(3, -1.0)
    assert torch.allclose(backward, forward.flip(0))
    two = exponential_weights(2, +1.0)
    assert math.isclose(float(two[1]), math.exp(2) / (1 + math.exp(2)), rel_tol=1e-12)


def test_new_rows_are_weighted_means_of_their_pieces_and_kept_rows_are_unchanged() -> None:
    torch.manual_seed(0)
    embed = torch.randn(10, 4)
    head = torch.randn(10, 4)
    new_tokens = {7: (1, 2, 3), 9: (4, 5)}
    new_embed, new_head = init_patched_embeddings(embed, head, new_tokens)
    w3, w2 = exponential_weights(3, +1.0).float(), exponential_weights(2, +1.0).float()
    assert torch.allclose(new_embed[7], w3[0] * embed[1] + w3[1] * embed[2] + w3[2] * embed[3], atol=1e-6)
    assert torch.allclose(new_head[7], w3[2] * head[1] + w3[1] * head[2] + w3[0] * head[3], atol=1e-6)
    assert torch.allclose(new_embed[9], w2[0] * embed[4] + w2[1] * embed[5], atol=1e-6)
    assert torch.allclose(new_head[9], w2[1] * head[4] + w2[0] * head[5], atol=1e-6)
    kept = [i for i in range(10) if i not in new_tokens]
    assert torch.equal(new_embed[kept], embed[kept]) and torch.equal(new_head[kept], head[kept])


def test_pieces_are_read_from_a_frozen_copy_when_a_new_id_is_also_a_piece_position() -> None:
    embed = torch.arange(12, dtype=torch.float32).view(6, 2)
    new_embed, _ = init_patched_embeddings(embed, None, {0: (1, 2), 1: (3, 4)})
    w = exponential_weights(2, +1.0).float()
    assert torch.allclose(new_embed[1], w[0] * embed[3] + w[1] * embed[4])
    assert torch.allclose(new_embed[0], w[0] * embed[1] + w[1] * embed[2])


def test_tied_state_dict_is_untied_with_its_own_lm_head() -> None:
    torch.manual_seed(1)
    embed = torch.randn(8, 3)
    state = {EMBED_KEY: embed, "model.norm.weight": torch.ones(3)}
    patched = patch_state_dict(state, {6: (2, 3)})
    assert LM_HEAD_KEY in patched and patched[LM_HEAD_KEY].data_ptr() != patched[EMBED_KEY].data_ptr()
    assert torch.equal(patched[LM_HEAD_KEY][:6], embed[:6]) and torch.equal(patched[EMBED_KEY][:6], embed[:6])
    assert not torch.allclose(patched[LM_HEAD_KEY][6], patched[EMBED_KEY][6])
    assert torch.equal(state[EMBED_KEY], embed), "the input state dict is not modified"
