"""The training loop of both training stages, ``train_policy`` (preference training) and ``sft``: epochs of seeded
batch orders, each global batch split over the processes (``parallel.share``), one step per batch, a checkpoint
every ``checkpoint_every`` steps and the resume from it, and a log row per step (a JSON line and a progress line in
the job log). What a step does is the stage's (``Loop.run``'s ``step``); everything else is here, so a resumed SFT
run and a resumed policy ends with the weights of an uninterrupted one in the same way.
"""
from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from workflow.lib.checkpoint import Checkpointer
from workflow.lib.progress import progress


def pairs_used(n_records: int, batch_size: int, world: int, key: str = "training.batch_size") -> int:
    """Examples trained on per epoch: all, unless a last partial batch has fewer examples than processes
    (each process needs at least one), which is then left out of the epoch, with a note in the log.
    ``key``: the config key of ``batch_size``, named in the error."""
    if batch_size < world:
        raise ValueError(f"{key} ({batch_size}) is the global batch and must be at least "
                         f"training.devices ({world}): every process needs examples")
    rest = n_records % batch_size
    return n_records - rest if 0 < rest < world else n_records


def total_steps(n_records: int, batch_size: int, epochs: int, world: int, key: str = "training.batch_size") -> int:
    """Optimizer steps of a run (the schedule's length)."""
    return math.ceil(pairs_used(n_records, batch_size, world, key) / batch_size) * epochs


class StepReport:
    """Where each step's log row goes besides the returned log: a JSON line of the ``printed`` keys and a
    progress line in the job log, on process 0 only (two processes' lines would interleave)."""

    def __init__(self, main: bool, desc: str, printed=("step", "loss", "seconds")):
        self.main, self.desc, self.printed = main, desc, printed
        self.bar = None

    def start(self, total: int, done: int) -> None:
        if self.main:
            self.bar = progress(total=total, desc=self.desc, unit="step", initial=done)

    def __call__(self, row: dict) -> None:
        if self.main:
            print(json.dumps({k: row[k] for k in self.printed}), flush=True)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class Loop:
    """What the loop steps, saves and restores: the (sharded) ``model`` whose Parameters the ``optimizer``
    holds, the schedule, the engine, the numpy RNG of the batch orders and a Python RNG the step draws from
    (ShaPO's γ; unused by SFT), and the checkpointer (None: no checkpoints, no resume)."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    parallel: object
    order_rng: np.random.Generator
    step_rng: random.Random
    checkpointer: Checkpointer | None = None

    def run(self, step: Callable[[np.ndarray, np.ndarray, int], dict], n_records: int, batch_size: int, epochs: int,
            report: StepReport, key: str = "training.batch_size") -> list[dict]:
        """Train; returns the per-step log. ``step(global_idx, local_idx, step_number)`` takes one optimizer step
        on the global batch's examples ``global_idx`` (this process's are ``local_idx``) and returns its log row,
        to which ``epoch`` and ``seconds`` are added. A matching checkpoint is resumed first: weights, optimizer,
        schedule, the epoch's batch order, the log and every RNG."""
        parallel, checkpointer = self.parallel, self.checkpointer
        used = pairs_used(n_records, batch_size, parallel.world, key)
        if used < n_records and parallel.main:
            print(json.dumps({"left_out_per_epoch": n_records - used, "reason": "last batch smaller than devices"}),
                  flush=True)
        steps_per_epoch = math.ceil(used / batch_size)
        total = steps_per_epoch * epochs
        rngs = (self.order_rng, self.step_rng)
        log, done, first_epoch, order = [], 0, 0, None
        resumed = checkpointer.load(self.model, self.optimizer, self.scheduler, rngs) if checkpointer else None
        if resumed:
            log, done, first_epoch, order = resumed["log"], resumed["step"], resumed["epoch"], np.array(resumed["order"])
            if parallel.main:  # one line per run, not per process
                print(json.dumps({"resumed_at_step": done, "of": total}), flush=True)
        report.start(total, done)
        self.model.train()
        for epoch in range(first_epoch, epochs):
            if order is None:
                order = self.order_rng.permutation(n_records)
            for start in range((done - epoch * steps_per_epoch) * batch_size, used, batch_size):
                done += 1
                t0 = time.perf_counter()
                global_idx = order[start:start + batch_size]
                row = step(global_idx, parallel.share(global_idx), done)
                row.update(epoch=epoch, seconds=time.perf_counter() - t0)
                log.append(row)
                report(row)
                if checkpointer and checkpointer.due(done, total):
                    if parallel.main or checkpointer.collective:
                        checkpointer.save(self.model, self.optimizer, self.scheduler,
                                          {"step": done, "epoch": epoch, "order": order.tolist(), "log": log}, rngs)
                    parallel.barrier()
            order = None
        report.close()
        return log
