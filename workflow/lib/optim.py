"""Optimizer and learning-rate schedule of the training stages (``train_policy``, ``sft``).

The settings are a validated config slice (``training`` or ``sft``): ``optimizer``, ``lr``,
``weight_decay``, ``warmup_steps``, ``warmup_ratio`` and ``schedule``, with the schema's defaults filled in.
"""
from __future__ import annotations

import math

import torch

OPTIMIZERS = ("adamw", "rmsprop")


def make_optimizer(params, settings: dict, total_steps: int):
    """(optimizer, scheduler) over the trainable ``params``: AdamW (fused on CPU and CUDA) or RMSprop,
    with ``warmup_steps`` warm-up steps when > 0, else ``ceil(warmup_ratio · total_steps)``, then
    ``schedule`` (transformers' schedules). ``settings``: the validated training or sft section."""
    from transformers import get_scheduler

    params = [p for p in params if p.requires_grad]
    kind = settings["optimizer"]
    if kind == "adamw":
        opt = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=settings["weight_decay"],
                                fused=all(p.device.type in ("cpu", "cuda") for p in params))
    elif kind == "rmsprop":
        opt = torch.optim.RMSprop(params, lr=settings["lr"])
    else:
        raise ValueError(f"optimizer: unknown optimizer {kind!r}; expected one of {OPTIMIZERS}")
    warmup = settings["warmup_steps"] or int(math.ceil(settings["warmup_ratio"] * total_steps))
    return opt, get_scheduler(settings["schedule"], opt, warmup, total_steps)
