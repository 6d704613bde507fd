"""ShaPO's sharpness-aware perturbation, restricted to the selected MLP neurons.

``perturb_selected`` moves only the selected neurons' output vectors uphill along their
gradient, in place, and returns copies of exactly those vectors; ``restore_selected`` writes
them back, so the weights are restored bit for bit. Extra memory is the selected slices only.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SelectedNeurons:
    """Neurons ``index`` of ``weight``, indexed along ``axis`` (1 for nn.Linear, 0 for GPT-2 Conv1D)."""

    weight: torch.nn.Parameter
    index: torch.Tensor
    axis: int


@torch.no_grad()
def selected_grad_norm(selected: list[SelectedNeurons]) -> float:
    """‖∇W[selected]‖₂ over all selected slices together."""
    return sum(float(s.weight.grad.index_select(s.axis, s.index).pow(2).sum()) for s in selected) ** 0.5


def step_size(sharpness: dict, selected: list[SelectedNeurons], rng) -> float:
    """γ of one sharpness-aware step.

    ``raw`` (the reference code): γ ~ U[γ_min, γ_max], so the move is γ·g and scales with the
    gradient. ``normalized`` (SAM): γ = ρ/‖g_S‖, so the move ρ·g/‖g_S‖ has length ρ whatever
    the gradient's scale.
    """
    if sharpness.get("perturbation", "raw") == "normalized":
        return sharpness["rho"] / max(selected_grad_norm(selected), 1e-12)
    return rng.uniform(sharpness["gamma_min"], sharpness["gamma_max"])


@torch.no_grad()
def perturb_selected(selected: list[SelectedNeurons], gamma: float) -> list[torch.Tensor]:
    """W[selected] += γ·∇W[selected] for every layer; returns the original slices."""
    saved = []
    for s in selected:
        if s.weight.grad is None:
            raise RuntimeError("perturb_selected needs gradients: call backward() first")
        saved.append(s.weight.index_select(s.axis, s.index))
        s.weight.index_add_(s.axis, s.index, s.weight.grad.index_select(s.axis, s.index), alpha=gamma)
    return saved


@torch.no_grad()
def restore_selected(selected: list[SelectedNeurons], saved: list[torch.Tensor]) -> None:
    """Undo ``perturb_selected`` exactly by copying the saved slices back."""
    for s, original in zip(selected, saved):
        s.weight.index_copy_(s.axis, s.index, original)
