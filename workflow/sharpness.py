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
