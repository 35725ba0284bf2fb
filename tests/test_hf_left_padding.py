"""hf.score_pair / hf.distillation_loss without a loss_mask on a left-padded batch: the first real token of a
row has only padding before it, so it is not scored (a padding position's hidden state predicts nothing)."""
import pytest
import torch

from opd_kernels import hf
from opd_kernels.hf.tiny import tiny_causal_lm


def test_next_token_mask_never_scores_from_a_padding_position():
    ids = torch.tensor([[0, 0, 5, 6, 7], [4, 5, 6, 7, 8]])
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    mask = hf.next_token_mask(ids, attn, None)
    assert mask.tolist() == [[False, False, True, True], [True, True, True, True]]
    # A loss_mask that marks the first real token does not make its padding position scored either.
    assert hf.next_token_mask(ids, attn, attn.bool()).tolist() == mask.tolist()


@pytest.mark.parametrize("divergence", ["reverse_kl", "forward_kl"])
def test_left_padded_rows_score_what_the_unpadded_rows_score(divergence):
    torch.manual_seed(0)
    student = tiny_causal_lm("llama", seed=1)
    teacher = tiny_causal_lm("llama", seed=2, hidden_size=48)
    rows = [[5, 9, 11, 30, 31, 32], [7, 8, 40]]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r)
        attn[i, width - len(r):] = 1
    got = hf.distillation_loss(student, teacher, ids, attention_mask=attn, divergence=divergence,
                               reduction="none", backend="torch")
    for i, r in enumerate(rows):
        alone = hf.distillation_loss(student, teacher, torch.tensor([r]), divergence=divergence,
                                     reduction="none", backend="torch")[0]
        first = width - len(r)
        assert float(got[i, first]) == 0.0  # the first real token: not scored from the padding before it
        torch.testing.assert_close(got[i, first:], alone, rtol=1e-5, atol=1e-6)
    mean = hf.distillation_loss(student, teacher, ids, attention_mask=attn, divergence=divergence,
                                backend="torch")
    assert float(mean) == pytest.approx(float(got.sum()) / sum(len(r) - 1 for r in rows), rel=1e-6)
