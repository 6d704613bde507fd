"""Preference losses as small pure tensor functions.

Per-pair losses take tensors of shape [B] and return shape [B]; the reduction over the batch
is separate (``reduce_losses``: the mean, or Dr.DPO's distributionally robust log-mean-exp).
``h`` is the DPO logit (policy minus reference log-ratio of chosen over rejected, eq. 7 of
Rafailov et al. 2023).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairLogps:
    """Summed answer log-probabilities of a batch of pairs, and the answers' token counts."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor
    reference_rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    soft_labels: torch.Tensor | None = None  # reward-level methods: p per pair (chosen preferred)

    @property
    def h(self) -> torch.Tensor:
        return dpo_logits(self.policy_chosen, self.policy_rejected, self.reference_chosen, self.reference_rejected)


def dpo_logits(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
               reference_chosen: torch.Tensor, reference_rejected: torch.Tensor) -> torch.Tensor:
    """h = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l)), shape [B]."""
    return (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected)


def dpo_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """−log σ(β·h) (eq. 7); with label smoothing ε this is cDPO: −(1−ε)·log σ(β·h) − ε·log σ(−β·h)."""
    return -(1.0 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def rdpo_loss(h: torch.Tensor, beta: float, epsilon: float) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, eq. 9): the unbiased loss under a flip rate ε < 0.5,
    ((1−ε)·ℓ(h) − ε·ℓ(−h)) / (1 − 2ε) with ℓ(h) = −log σ(β·h)."""
    return ((1.0 - epsilon) * -F.logsigmoid(beta * h) - epsilon * -F.logsigmoid(-beta * h)) / (1.0 - 2.0 * epsilon)


def ipo_loss(h: torch.Tensor, tau: float) -> torch.Tensor:
    """IPO (Azar et al. 2024, eq. 17): (h − 1/(2τ))²."""
    return (h - 1.0 / (2.0 * tau)) ** 2


def simpo_loss(avg_chosen: torch.Tensor, avg_rejected: torch.Tensor, beta: float, margin: float) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6), reference-free on length-normalised log-probs:
    −log σ(β·(avg log π(y_w) − avg log π(y_l)) − γ)."""
    return -F.logsigmoid(beta * (avg_chosen - avg_rejected) - margin)


def soft_label_loss(h: torch.Tensor, beta: float, p: torch.Tensor) -> torch.Tensor:
    """Reward-level ShaPO: cross-entropy between a soft label p (chosen preferred) and σ(β·h)."""
    return -p * F.logsigmoid(beta * h) - (1.0 - p) * F.logsigmoid(-beta * h)


def soft_labels(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor, beta_r: float) -> torch.Tensor:
    """p = σ(β_r·(r_chosen − r_rejected))."""
    return torch.sigmoid(beta_r * (reward_chosen - reward_rejected))


LOSSES = ("dpo", "cdpo", "rdpo", "ipo", "simpo")


def pair_losses(method: dict, logps: PairLogps) -> torch.Tensor:
    """Per-pair loss [B] of a method preset (``loss``, ``beta`` and the loss's own parameter).

    A preset with ``reward_labels`` is reward-level: the DPO loss's hard label 1 is replaced by
    the pair's soft label p from a reward model (``logps.soft_labels``).
    """
    kind, beta = method["loss"], method["beta"]
    if "reward_labels" in method:
        if kind != "dpo":
            raise ValueError(f"reward_labels replace the DPO label; a reward-level preset needs loss dpo, not {kind!r}")
        if logps.soft_labels is None:
            raise ValueError("a reward-level preset (reward_labels) needs soft labels from the reward model")
        return soft_label_loss(logps.h, beta, logps.soft_labels)
    if kind == "dpo":
        return dpo_loss(logps.h, beta)
    if kind == "cdpo":
        return dpo_loss(logps.h, beta, method["label_smoothing"])
    if kind == "rdpo":
        return rdpo_loss(logps.h, beta, method["label_smoothing"])
    if kind == "ipo":
        return ipo_loss(logps.h, beta)
    if kind == "simpo":
        avg_w = logps.policy_chosen / logps.chosen_tokens.clamp(min=1)
        avg_l = logps.policy_rejected / logps.rejected_tokens.clamp(min=1)
        return simpo_loss(avg_w, avg_l, beta, method.get("simpo_margin", 0.5))
    raise ValueError(f"unknown loss {kind!r}; expected one of {LOSSES}")


def reduce_losses(losses: torch.Tensor, dr_beta: float | None = None) -> torch.Tensor:
    """Mean over the batch, or Dr.DPO's −β′·log mean exp(−ℓ_i/β′) (Wu et al. 2024) when ``dr_beta`` is set.

    Dr.DPO's reduction weights each pair by exp(−ℓ_i/β′): pairs the model finds implausible
    (high loss, often the flipped ones) count less; β′ → ∞ recovers the mean.
    """
    if dr_beta is None:
        return losses.mean()
    return -dr_beta * (torch.logsumexp(-losses / dr_beta, dim=0) - math.log(losses.numel()))


def data_parallel_reduction(losses: torch.Tensor, dr_beta: float | None, world: int, all_sum, all_max):
    """The batch loss when the batch is split over ``world`` data-parallel processes.

    Returns (surrogate, value): ``value`` is ``reduce_losses`` of the whole batch (all processes'
    pairs), identical on every process; ``surrogate`` is this process's share Σ_local w_i·ℓ_i·world,
    with w_i = ∂value/∂ℓ_i held constant (1/N for the mean, the softmax of −ℓ/β′ for Dr.DPO), so the
    gradients averaged over processes (what DDP does) are exactly the whole batch's gradient, also
    for Dr.DPO's log-mean-exp, which does not split into per-process means. ``all_sum`` and
    ``all_max`` reduce a tensor over the processes (identity with one process).
    """
    detached = losses.detach()
    n = all_sum(torch.tensor(float(losses.numel()), device=losses.device))
    if dr_beta is None:
        value = all_sum(detached.sum()) / n
        weights = torch.ones_like(detached) / n
    else:
        a = -detached / dr_beta
        top = all_max(a.max() if a.numel() else torch.tensor(-math.inf, device=a.device))
        total = all_sum(torch.exp(a - top).sum())
        value = -dr_beta * (top + torch.log(total) - torch.log(n))
        weights = torch.exp(a - top) / total
    return world * (weights * losses).sum(), value
