"""ShaPO's sharpness-aware perturbation, restricted to the selected MLP neurons.

``perturbed_set`` binds what a method perturbs (the probe-selected neurons, as many random ones, every
MLP output neuron, or every parameter) to a model's weights.

``perturb_selected`` moves only the selected neurons' output vectors uphill along their
gradient, in place, and returns copies of exactly those vectors; ``restore_selected`` writes
them back, so the weights are restored bit for bit. Extra memory is the selected slices only.

Under sharded training (``training.parallel: fsdp``) a weight and its gradient are DTensors of which
this process holds some rows; every function here works on ``local(...)``, this process's rows, with
``SelectedNeurons.index`` already in local terms (``FullyShardedParallel.bind``). The move and the
restore are then local to each process and no weight is ever gathered; a sum over the selection (a
norm) is a local sum that ``sum_over_shards`` totals.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, safe_open

from workflow.models import mlp_output_projections, split_by_layer


@dataclass
class SelectedNeurons:
    """Neurons ``index`` of ``weight``, indexed along ``axis`` (1 for nn.Linear, 0 for GPT-2 Conv1D)."""

    weight: torch.nn.Parameter
    index: torch.Tensor
    axis: int


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of a weight or gradient: the local rows of a sharded DTensor (the same
    storage, so in-place changes under no_grad reach the sharded weight), else ``t`` itself."""
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def selected_grad_norm(selected: list[SelectedNeurons], sum_over_shards=_identity) -> float:
    """‖∇W[selected]‖₂ over all selected slices together. ``sum_over_shards`` adds up the parts held by
    other processes when weights are sharded (``DataParallel.sum_over_shards``; identity otherwise)."""
    part = sum(local(s.weight.grad).index_select(s.axis, s.index).float().pow(2).sum() for s in selected)
    return float(sum_over_shards(torch.as_tensor(part))) ** 0.5


def step_size(sharpness: dict, selected: list[SelectedNeurons], rng, sum_over_shards=_identity) -> float:
    """γ of one sharpness-aware step.

    ``raw`` (the reference code): γ ~ U[γ_min, γ_max], so the move is γ·g and scales with the
    gradient. ``normalized`` (SAM): γ = ρ/‖g_S‖, so the move ρ·g/‖g_S‖ has length ρ whatever
    the gradient's scale.
    """
    if sharpness["perturbation"] == "normalized":
        return sharpness["rho"] / max(selected_grad_norm(selected, sum_over_shards), 1e-12)
    return rng.uniform(sharpness["gamma_min"], sharpness["gamma_max"])


@torch.no_grad()
def perturb_selected(selected: list[SelectedNeurons], gamma: float) -> list[torch.Tensor]:
    """W[selected] += γ·∇W[selected] for every layer; returns the original slices."""
    saved = []
    for s in selected:
        if s.weight.grad is None:
            raise RuntimeError("perturb_selected needs gradients: call backward() first")
        weight, grad = local(s.weight), local(s.weight.grad)
        saved.append(weight.index_select(s.axis, s.index))
        weight.index_add_(s.axis, s.index, grad.index_select(s.axis, s.index), alpha=gamma)
    return saved


@torch.no_grad()
def restore_selected(selected: list[SelectedNeurons], saved: list[torch.Tensor]) -> None:
    """Undo ``perturb_selected`` exactly by copying the saved slices back."""
    for s, original in zip(selected, saved):
        local(s.weight).index_copy_(s.axis, s.index, original)


def perturbed_set(model, sharpness: dict, subspace_path: str | None, seed: int) -> list[SelectedNeurons]:
    """What a sharpness-aware step moves, by ``sharpness.subspace``:

    ``probe`` the probe-selected neurons (the method); ``random`` as many neurons drawn at
    random from all MLP output neurons (seeded); ``uniform`` every MLP output neuron; ``full``
    every parameter (plain SAM).
    """
    kind = sharpness["subspace"]
    if kind == "full":
        return [SelectedNeurons(p, torch.arange(p.shape[0]), 0) for p in model.parameters() if p.requires_grad]
    layers = mlp_output_projections(model)
    if kind == "uniform":
        return [SelectedNeurons(l.weight, torch.arange(l.n_neurons), l.axis) for l in layers]
    if subspace_path is None:
        raise ValueError(f"sharpness.subspace {kind!r} needs the selected subspace (--subspace)")
    probe = load_selected_neurons(model, subspace_path)
    if kind == "probe":
        return probe
    if kind == "random":
        count = sum(len(s.index) for s in probe)
        sizes = [l.n_neurons for l in layers]
        pick = torch.randperm(sum(sizes), generator=torch.Generator().manual_seed(seed))[:count]
        chosen = split_by_layer(pick, sizes)
        return [SelectedNeurons(l.weight, idx, l.axis) for l, idx in zip(layers, chosen) if len(idx)]
    raise ValueError(f"unknown sharpness.subspace {kind!r}; expected probe, random, uniform or full")


def load_selected_neurons(model, path: str) -> list[SelectedNeurons]:
    """The subspace chosen by ``select_subspace``, bound to this model's weights."""
    with safe_open(path, "pt") as f:
        names = json.loads(f.metadata()["names"])
    tensors = load_file(path)
    layers = {l.name: l for l in mlp_output_projections(model)}
    selected = []
    for i, name in enumerate(names):
        if name not in layers:
            raise ValueError(f"{path}: layer {name!r} is not in the model being trained")
        index = tensors[f"layer{i}.index"]
        if len(index):
            selected.append(SelectedNeurons(layers[name].weight, index, layers[name].axis))
    return selected
