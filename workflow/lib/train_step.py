"""One optimizer step of preference training: the loss of a batch under a method preset, the
sharpness-aware pass of ShaPO and its controls, and the step's log row.

``train_step`` is the place a new method touches: the loss and reduction come from the preset
(``workflow.lib.losses``), the sharpness-aware pass from its ``sharpness`` block (``workflow.lib.sharpness``),
and everything else (resume, checkpoints, data parallelism, logging) stays in the training loop of
``workflow.train_policy``.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from workflow.lib.losses import PairLogps, data_parallel_reduction, pair_losses, reduce_losses
from workflow.lib.pairs import answer_token_counts, sequence_logps
from workflow.lib.parallel import DataParallel
from workflow.lib.sharpness import (
    SelectedNeurons,
    gradient_change,
    measure_move,
    perturb_selected,
    restore_selected,
    step_size,
)


class NonFiniteLoss(FloatingPointError):
    pass


# Diagnostics of a sharpness-aware step (NaN on plain steps), see ``gradients_at_perturbed_point``:
# ‖g_S‖ on the moved weights, the whole-model ‖∇L(θ)‖, the move ‖δ‖ and ‖δ‖/‖W_S‖, the fraction of moved
# weights changed in the compute precision, and cos(∇L(θ), ∇L(θ+δ)) with the relative change of the norm.
# ΔL is loss_perturbed − loss.
SHARPNESS_COLUMNS = ["grad_norm_moved", "grad_norm_at_theta", "move_norm", "move_relative", "effective_fraction",
                     "grad_cosine", "grad_norm_change"]
LOG_COLUMNS = ["step", "epoch", "loss", "loss_perturbed", "sharpness_step", "gamma", *SHARPNESS_COLUMNS, "margin",
               "acc_clean", "acc_flipped", "n_clean", "n_flipped", "grad_norm", "lr", "seconds"]


@dataclass
class Trainer:
    """What every step needs: the model (``forward`` is its data-parallel wrapper, ``model`` the
    unwrapped one whose Parameters ``selected`` and checkpoints refer to), optimizer and schedule,
    the method preset and training settings, and the RNG of the sharpness step sizes. ``matched_to``: the
    probe-selected neurons whose raw move a ``matched`` control copies the length of (None otherwise)."""

    model: torch.nn.Module
    forward: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    method: dict
    settings: dict
    parallel: DataParallel
    selected: list[SelectedNeurons] | None = None
    gamma_rng: random.Random = field(default_factory=lambda: random.Random(0))
    matched_to: list[SelectedNeurons] | None = None

    def is_sharpness_step(self, step: int) -> bool:
        sharp = self.method.get("sharpness")
        return bool(sharp) and step % sharp["interval"] == 0


def preference_loss(model, batch: dict, records: list[dict], method: dict, parallel: DataParallel):
    """(loss to differentiate, batch loss value, h [B]) for one batch under the method's loss and reduction.

    With several processes the value is the whole global batch's loss and the differentiated loss
    this process's share of it (``data_parallel_reduction``); with one they are the same tensor.
    """
    with parallel.autocast():
        logps = sequence_logps(model, batch)
    counts, n = answer_token_counts(batch), len(records)
    device = logps.device
    labels = torch.tensor([r["soft_label"] for r in records], device=device) if "reward_labels" in method else None
    pair = PairLogps(logps[:n].float(), logps[n:].float(),
                     torch.tensor([r["ref_chosen"] for r in records], device=device),
                     torch.tensor([r["ref_rejected"] for r in records], device=device),
                     counts[:n].to(device), counts[n:].to(device), labels)
    losses = pair_losses(method, pair)
    if parallel.world == 1:
        loss = reduce_losses(losses, method.get("dr_beta"))
        return loss, loss.detach(), pair.h.detach()
    surrogate, value = data_parallel_reduction(losses, method.get("dr_beta"), parallel.world,
                                               parallel.all_sum, parallel.all_max)
    return surrogate, value, pair.h.detach()


def check_finite(loss: torch.Tensor, step: int, records: list[dict], where: str) -> None:
    if not torch.isfinite(loss):
        ids = ", ".join(r["pair_id"] for r in records)
        raise NonFiniteLoss(f"non-finite {where} loss ({loss.item()}) at step {step}, pairs: {ids}")


def gradients_at_perturbed_point(trainer: Trainer, batch, records, gamma: float, step: int,
                                 all_records: list[dict], frozen=(), trainable=None) -> tuple[float, dict]:
    """ShaPO's second pass: move the selected weights by γ·∇ (using the gradients already in
    ``.grad``), recompute loss and gradients there, restore the weights exactly. Leaves the
    perturbed-point gradients in ``.grad``; returns the perturbed-point loss and the step's diagnostics
    (``SHARPNESS_COLUMNS``). ``records`` are this process's pairs, ``all_records`` the global batch's
    (named when the loss is not finite); ``trainable`` the parameters the optimizer steps (default: all
    that require gradients), over which the gradient cosine is taken.

    The cosine needs the gradient at θ after the second backward has written the one at θ+δ: the
    ``.grad`` tensors of θ are kept by reference while ``.grad`` is reset (no copy, fp32 like the
    weights), so during the second pass the trainable parameters' gradient is held twice, one extra
    gradient's memory (e.g. +25% over weights, gradient and AdamW state). ``sharpness.gradient_cosine:
    false`` drops them before the second pass instead (the cosine columns are then NaN).
    """
    parallel = trainer.parallel
    trainable = [p for p in trainer.model.parameters() if p.requires_grad] if trainable is None else trainable
    saved = perturb_selected(trainer.selected, gamma)
    diagnostics = measure_move(trainer.selected, saved, gamma, torch.bfloat16 if parallel.bf16 else torch.float32,
                               parallel.sum_over_shards)
    at_theta = [p.grad for p in trainable]
    if not trainer.method["sharpness"]["gradient_cosine"]:
        diagnostics |= gradient_change(at_theta, None, parallel.sum_over_shards)
        at_theta = None
    for p in trainer.model.parameters():
        p.grad = None
    loss, value, _ = preference_loss(trainer.forward, batch, records, trainer.method, parallel)
    check_finite(value, step, all_records, "perturbed")
    loss.backward()
    parallel.average_gradients(frozen)
    restore_selected(trainer.selected, saved)
    if at_theta is not None:
        diagnostics |= gradient_change(at_theta, [p.grad for p in trainable], parallel.sum_over_shards)
    return value.item(), diagnostics


def frozen_perturbed_weights(trainer: Trainer, sharpness_step: bool) -> list[torch.nn.Parameter]:
    """With LoRA the perturbed base weights are frozen: they need gradients on sharpness-aware steps
    only, and never reach the optimizer (built from the trainable parameters)."""
    if not sharpness_step:
        return []
    # a matched control also needs the probe neurons' gradients (the length it copies)
    moved = trainer.selected + (trainer.matched_to or [])
    return list({id(s.weight): s.weight for s in moved if not s.weight.requires_grad}.values())


def batch_metrics(h: torch.Tensor, records: list[dict], n_global: int, beta: float,
                  parallel: DataParallel) -> dict:
    """Mean margin β·h and accuracy (h > 0) on clean and on flipped pairs, over the whole global
    batch (sums over every process's pairs)."""
    flipped = torch.tensor([bool(r.get("flipped", False)) for r in records], device=h.device)
    correct = (h > 0).float()
    margin, right_clean, n_clean, right_flipped, n_flipped = parallel.all_sum(torch.stack([
        (beta * h).sum(), correct[~flipped].sum(), (~flipped).sum().float(),
        correct[flipped].sum(), flipped.sum().float()])).tolist()
    return {"margin": margin / n_global,
            "acc_clean": right_clean / n_clean if n_clean else float("nan"),
            "acc_flipped": right_flipped / n_flipped if n_flipped else float("nan"),
            "n_clean": int(n_clean), "n_flipped": int(n_flipped)}


def train_step(trainer: Trainer, batch: dict, records: list[dict], all_records: list[dict], step: int) -> dict:
    """One optimizer step on ``batch`` (this process's ``records`` of the global batch ``all_records``);
    returns the step's log row (without ``epoch`` and ``seconds``, which the loop adds)."""
    sharp = trainer.is_sharpness_step(step)
    trainable = [p for p in trainer.model.parameters() if p.requires_grad] if sharp else None
    frozen = frozen_perturbed_weights(trainer, sharp)
    for w in frozen:
        w.requires_grad_(True)
    loss, value, h = preference_loss(trainer.forward, batch, records, trainer.method, trainer.parallel)
    check_finite(value, step, all_records, "training")
    loss.backward()
    trainer.parallel.average_gradients(frozen)
    row = {"step": step, "loss": value.item(), "loss_perturbed": float("nan"), "sharpness_step": sharp,
           "gamma": 0.0} | dict.fromkeys(SHARPNESS_COLUMNS, float("nan"))
    if sharp:
        gamma = step_size(trainer.method["sharpness"], trainer.selected, trainer.gamma_rng,
                          trainer.parallel.sum_over_shards, trainer.matched_to)
        loss2, diagnostics = gradients_at_perturbed_point(trainer, batch, records, gamma, step, all_records, frozen,
                                                          trainable)
        row.update(loss_perturbed=loss2, gamma=gamma, **diagnostics)
    for w in frozen:
        w.requires_grad_(False)
        w.grad = None
    grad_norm = torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), trainer.settings["max_grad_norm"])
    trainer.optimizer.step()
    trainer.scheduler.step()
    trainer.optimizer.zero_grad()
    row.update(batch_metrics(h, records, len(all_records), trainer.method["beta"], trainer.parallel))
    row.update(grad_norm=float(grad_norm), lr=trainer.scheduler.get_last_lr()[0])
    return row
