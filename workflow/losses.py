"""Preference losses as small pure tensor functions.

All take per-pair summed log-probabilities, shape [B], and return per-pair losses, shape [B];
the caller takes the mean. Equation numbers refer to Rafailov et al. 2023 (DPO).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_logits(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
               reference_chosen: torch.Tensor, reference_rejected: torch.Tensor) -> torch.Tensor:
    """h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)), shape [B]."""
    return (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)


def dpo_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """−log σ(β·h) (eq. 7), or with label smoothing ε (cDPO) −(1−ε)·log σ(β·h) − ε·log σ(−β·h)."""
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


LOSSES = {"dpo": dpo_loss}
