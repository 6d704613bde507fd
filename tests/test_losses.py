import math

import torch

from workflow.losses import dpo_logits, dpo_loss


def test_dpo_logit_and_loss_match_hand_computation():
    # policy gains 0.5 nats on the chosen answer and loses 0.5 on the rejected one, relative to the reference
    h = dpo_logits(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]))
    assert h.item() == 1.0
    # -log sigmoid(0.1 * 1.0) = log(1 + exp(-0.1))
    assert math.isclose(dpo_loss(h, beta=0.1).item(), math.log(1 + math.exp(-0.1)), rel_tol=1e-6)
    assert math.isclose(dpo_loss(h, beta=0.1).item(), 0.6443966600735709, rel_tol=1e-6)


def test_dpo_loss_is_log2_at_the_reference():
    assert math.isclose(dpo_loss(torch.zeros(3), beta=0.5).mean().item(), math.log(2), rel_tol=1e-6)


def test_label_smoothing_mixes_both_directions():
    h = torch.tensor([2.0])
    eps, beta = 0.1, 0.5
    expected = (1 - eps) * math.log(1 + math.exp(-beta * 2.0)) + eps * math.log(1 + math.exp(beta * 2.0))
    assert math.isclose(dpo_loss(h, beta, label_smoothing=eps).item(), expected, rel_tol=1e-6)


def test_loss_is_per_pair():
    assert dpo_loss(torch.tensor([1.0, -1.0, 0.0]), beta=0.1).shape == (3,)
