"""Preference losses as small pure tensor functions, and the registry that maps a preset's ``loss`` to one.

Per-pair losses take tensors of shape [B] and return shape [B]; the reduction over the batch
is separate (``reduce_losses``: the mean, or Dr.DPO's distributionally robust log-mean-exp).
``h`` is the DPO logit (policy minus reference log-ratio of chosen over rejected, eq. 7 of
Rafailov et al. 2023), on log-probabilities summed over the answer tokens.

``LOSSES`` maps each name of the schema's ``presets.*.loss`` enum to ``Loss(fn, params)``:
``fn(logps, preset)`` gives the per-pair losses, ``params`` names the preset keys it reads
besides ``beta``. A new loss is one ``@register("name", "param", ...)`` function here plus its
name in the schema's enum (and a schema property per new parameter); docs/training.md lists the
equations and the mapping of every loss to TRL 1.16 and to the official ShaPO code, which
tests/test_losses_trl.py checks against TRL's own loss code.
"""
from __future__ import annotations

import math
from collections.abc import Callable
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

    @property
    def h_per_token(self) -> torch.Tensor:
        """h from log-ratios averaged over each answer's tokens (a zero-token answer counts as one token)."""
        return ((self.policy_chosen - self.reference_chosen) / self.chosen_tokens.clamp(min=1)
                - (self.policy_rejected - self.reference_rejected) / self.rejected_tokens.clamp(min=1))


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
    """IPO (Azar et al. 2024, eq. 17): (h − 1/(2τ))². On summed log-probs as the paper and the official
    ShaPO code; TRL's ipo feeds per-token averaged log-ratios (preset key ``length_normalize``)."""
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


# ---- the loss registry: a preset's ``loss`` name -> its per-pair loss on a batch ----

@dataclass(frozen=True)
class Loss:
    """A per-pair loss as a preset names it: ``fn(logps, preset) -> [B]``, and the preset keys it reads besides
    ``beta`` (``params``; each must be a preset property of the schema: tests/test_losses.py checks it)."""

    fn: Callable[[PairLogps, dict], torch.Tensor]
    params: tuple[str, ...]


LOSSES: dict[str, Loss] = {}  # in the order of the schema's enum presets.*.loss (tests/test_config.py)


def register(name: str, *params: str):
    """Decorator: ``@register("name", "param", ...)`` adds a loss to ``LOSSES``. Adding a loss is this function
    plus its name in the schema's enum (and any new parameter as a preset property there)."""
    def add(fn):
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is registered twice")
        LOSSES[name] = Loss(fn, params)
        return fn
    return add


def preset_h(logps: PairLogps, preset: dict) -> torch.Tensor:
    """The DPO logit the preset's loss sees: ``h``, or with ``length_normalize`` the per-token averaged log-ratios
    (log π/π_ref)(y_w)/|y_w| − (log π/π_ref)(y_l)/|y_l| (TRL's ``ipo`` and ``sigmoid_norm``)."""
    return logps.h_per_token if preset["length_normalize"] else logps.h


@register("dpo", "length_normalize")
def _dpo(logps: PairLogps, preset: dict) -> torch.Tensor:
    return dpo_loss(preset_h(logps, preset), preset["beta"])


@register("cdpo", "label_smoothing", "length_normalize")
def _cdpo(logps: PairLogps, preset: dict) -> torch.Tensor:
    return dpo_loss(preset_h(logps, preset), preset["beta"], preset["label_smoothing"])


@register("rdpo", "label_smoothing", "length_normalize")
def _rdpo(logps: PairLogps, preset: dict) -> torch.Tensor:
    return rdpo_loss(preset_h(logps, preset), preset["beta"], preset["label_smoothing"])


@register("ipo", "length_normalize")
def _ipo(logps: PairLogps, preset: dict) -> torch.Tensor:
    return ipo_loss(preset_h(logps, preset), preset["beta"])


def simpo_margin(preset: dict) -> float:
    """SimPO's γ: ``simpo_margin`` (absolute, as in the SimPO paper and TRL's ``simpo_gamma``) or
    ``simpo_gamma_ratio``·β (the official ShaPO code's ``simpo_gamma_beta_ratio``); exactly one is set
    (workflow.lib.checks.check_presets)."""
    if "simpo_gamma_ratio" in preset:
        return preset["simpo_gamma_ratio"] * preset["beta"]
    if "simpo_margin" in preset:
        return preset["simpo_margin"]
    raise ValueError("a simpo preset needs simpo_margin (absolute γ) or simpo_gamma_ratio (γ = ratio·β)")


@register("simpo", "simpo_margin", "simpo_gamma_ratio")
def _simpo(logps: PairLogps, preset: dict) -> torch.Tensor:
    return simpo_loss(logps.policy_chosen / logps.chosen_tokens.clamp(min=1),
                      logps.policy_rejected / logps.rejected_tokens.clamp(min=1), preset["beta"], simpo_margin(preset))


def pair_losses(method: dict, logps: PairLogps) -> torch.Tensor:
    """Per-pair loss [B] of a method preset (validated, schema defaults filled: ``workflow.lib.config.fill_defaults``).

    A preset with ``reward_labels`` is reward-level: the DPO loss's hard label 1 is replaced by
    the pair's soft label p from a reward model (``logps.soft_labels``).
    """
    kind = method["loss"]
    if "reward_labels" in method:  # loss dpo (workflow.lib.checks.check_preset)
        if logps.soft_labels is None:
            raise ValueError("a reward-level preset (reward_labels) needs soft labels from the reward model")
        return soft_label_loss(preset_h(logps, method), method["beta"], logps.soft_labels)
    if kind not in LOSSES:
        raise ValueError(f"unknown loss {kind!r}; expected one of {list(LOSSES)}")
    return LOSSES[kind].fn(logps, method)


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
