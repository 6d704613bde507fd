"""ShaPO's sharpness-aware perturbation, restricted to the selected MLP neurons.

``perturbed_set`` binds what a method perturbs (the probe-selected neurons, as many random ones, every
MLP output neuron, or every parameter) to a model's weights.

``perturb_selected`` moves only the selected neurons' output vectors uphill along their
gradient, in place, and returns copies of exactly those vectors; ``restore_selected`` writes
them back, so the weights are restored bit for bit. Extra memory is the selected slices only.

``measure_move`` and ``gradient_change`` are the step's diagnostics (is the move large enough to
change anything?): the move's length, the fraction of moved weights whose value in the compute
precision changed, and how far the gradient at the moved point differs from the gradient at θ.
Every norm, dot product and count is a sum of local parts passed through ``sum_over_shards``
(``DataParallel.sum_over_shards``), so it stays right when weights and gradients are sharded.

Under sharded training (``training.parallel: fsdp``) a weight and its gradient are DTensors of which
this process holds some rows; every function here works on ``local(...)``, this process's rows, with
``SelectedNeurons.index`` already in local terms (``FullyShardedParallel.bind``). The move and the
restore are then local to each process and no weight is ever gathered; a sum over the selection (a
norm) is a local sum that ``sum_over_shards`` totals.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, safe_open

from workflow.lib.models import mlp_output_projections, split_by_layer


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


def step_size(sharpness: dict, selected: list[SelectedNeurons], rng, sum_over_shards=_identity,
              probe: list[SelectedNeurons] | None = None) -> float:
    """γ of one sharpness-aware step.

    ``raw`` (the reference code): γ ~ U[γ_min, γ_max], so the move is γ·g and scales with the
    gradient. ``normalized`` (SAM): γ = ρ/‖g_S‖, so the move ρ·g/‖g_S‖ has length ρ whatever
    the gradient's scale. ``matched`` (the fair control): γ ~ U[γ_min, γ_max] is drawn as for ``raw``
    and rescaled by ‖g_probe‖/‖g_S‖, so the control moves its own subspace (random or uniform neurons)
    exactly as far, γ·‖g_probe‖, as the raw step on the probe subspace ``probe`` would move at this step.
    """
    kind = sharpness["perturbation"]
    if kind == "normalized":
        return sharpness["rho"] / max(selected_grad_norm(selected, sum_over_shards), 1e-12)
    gamma = rng.uniform(sharpness["gamma_min"], sharpness["gamma_max"])  # raw and matched draw alike
    if kind == "matched":
        if not probe:
            raise ValueError("sharpness.perturbation matched needs the probe-selected neurons (--subspace)")
        return gamma * selected_grad_norm(probe, sum_over_shards) / max(selected_grad_norm(selected, sum_over_shards),
                                                                        1e-12)
    return gamma


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


def _sq_norm(t: torch.Tensor) -> torch.Tensor:
    """‖t‖² as a float64 scalar; the norm itself is one reduction in t's dtype, with no copy of t."""
    return torch.linalg.vector_norm(t).double().pow(2)


@torch.no_grad()
def measure_move(selected: list[SelectedNeurons], saved: list[torch.Tensor], gamma: float,
                 compute_dtype: torch.dtype, sum_over_shards=_identity) -> dict:
    """What ``perturb_selected(selected, gamma)`` did, measured right after it (``saved``: its return value):

    - ``grad_norm_moved`` ‖g_S‖, the gradient norm on the moved weights;
    - ``move_norm`` ‖δ‖ = γ·‖g_S‖, the length of the move as the formula prescribes, and
      ``move_relative`` ‖δ‖/‖W_S‖ against the moved weights' own norm;
    - ``effective_fraction``: the fraction of moved weights whose value as the forward pass sees it
      (rounded to ``compute_dtype``: bf16 under autocast, else fp32) differs after the move. A move much
      smaller than the spacing of that dtype at the weight's magnitude rounds back to the same value.

    Reads the moved slices, their gradients and the saved originals once; the sums are local and reduced
    with one ``sum_over_shards``.
    """
    parts = []
    for s, before in zip(selected, saved):
        after = local(s.weight).index_select(s.axis, s.index)
        grad = local(s.weight.grad).index_select(s.axis, s.index)
        changed = after.to(compute_dtype) != before.to(compute_dtype)
        parts.append(torch.stack([_sq_norm(grad), _sq_norm(before), changed.sum().double(),
                                  torch.tensor(float(before.numel()), dtype=torch.float64, device=before.device)]))
    grad_sq, weight_sq, changed, count = sum_over_shards(torch.stack(parts).sum(0)).tolist()
    grad_norm = math.sqrt(grad_sq)
    move = gamma * grad_norm
    return {"grad_norm_moved": grad_norm, "move_norm": move,
            "move_relative": move / math.sqrt(weight_sq) if weight_sq > 0 else math.nan,
            "effective_fraction": changed / count if count else math.nan}


@torch.no_grad()
def gradient_change(at_theta: list, at_moved: list | None, sum_over_shards=_identity) -> dict:
    """The whole-model gradient at θ against the one at θ+δ (the one the optimizer uses), over the
    same parameters (``.grad`` tensors in the same order; None counts as zeros):

    - ``grad_norm_at_theta`` ‖a‖ with a = ∇L(θ);
    - ``grad_cosine`` cos(a, b) with b = ∇L(θ+δ), computed as 1 − (‖a−b‖² − (‖a‖−‖b‖)²)/(2‖a‖‖b‖),
      which stays exact near 1 (a dot product in fp32 cannot tell 1 − 1e-7 from 1), and is exactly 1
      when the two gradients are identical;
    - ``grad_norm_change`` (‖b‖ − ‖a‖)/‖a‖.

    With ``at_moved`` None only the norm at θ is computed (the cosine columns are NaN). One pass over
    the gradients, local sums, one ``sum_over_shards``.
    """
    parts, device = [], None
    for i, a in enumerate(at_theta):
        b = at_moved[i] if at_moved is not None else None
        if a is None and b is None:
            continue
        a, b = (None if a is None else local(a)), (None if b is None else local(b))
        ref = a if a is not None else b
        device = ref.device
        zero = torch.zeros((), dtype=torch.float64, device=device)
        a_sq = _sq_norm(a) if a is not None else zero
        b_sq = _sq_norm(b) if b is not None else zero
        if at_moved is None:
            diff_sq = zero
        elif a is None or b is None:
            diff_sq = b_sq if a is None else a_sq
        else:
            diff_sq = torch.dist(a, b).double().pow(2)
        parts.append(torch.stack([a_sq, b_sq, diff_sq]))
    sums = torch.stack(parts).sum(0) if parts else torch.zeros(3, dtype=torch.float64)
    a_sq, b_sq, diff_sq = sum_over_shards(sums).tolist()
    norm_a, norm_b = math.sqrt(a_sq), math.sqrt(b_sq)
    if at_moved is None or norm_a == 0 or norm_b == 0:
        return {"grad_norm_at_theta": norm_a, "grad_cosine": math.nan,
                "grad_norm_change": (norm_b - norm_a) / norm_a if at_moved is not None and norm_a else math.nan}
    gap = (diff_sq - (norm_a - norm_b) ** 2) / (2 * norm_a * norm_b)
    return {"grad_norm_at_theta": norm_a, "grad_cosine": min(1.0, max(-1.0, 1.0 - gap)),
            "grad_norm_change": (norm_b - norm_a) / norm_a}


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


def matched_reference(model, sharpness: dict, subspace_path: str | None) -> list[SelectedNeurons] | None:
    """The probe-selected neurons whose raw move a ``matched`` control copies the length of (None otherwise)."""
    if sharpness["perturbation"] != "matched":
        return None
    if subspace_path is None:
        raise ValueError("sharpness.perturbation matched needs the selected subspace (--subspace): the control "
                         "moves as far as the probe-subspace step would")
    return load_selected_neurons(model, subspace_path)


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
