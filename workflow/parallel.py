"""Data-parallel training: this process's device, precision, rank and world size, and the reductions
the training loop needs across processes.

Under ``torchrun --nproc_per_node N`` (the ``train_policy`` rule launches it for
``training.devices: N``) accelerate sets up the process group (gloo on CPUs, NCCL on GPUs) and the
device; the model is wrapped in DDP. With one process every reduction is the identity, so the loop
is the plain one-process loop.
"""
from __future__ import annotations

import numpy as np
import torch

from workflow.models import placement


class DataParallel:
    """This process's place in (data-parallel) training: device, precision, rank and world size.

    accelerate sets up the device and, under torchrun, the process group; with one process
    (world 1) the reductions are the identity and the loop is the plain one-process loop.
    """

    def __init__(self, precision: str = "auto"):
        from accelerate import Accelerator

        device, dtype = placement(precision)  # the same precision rule as the inference stages
        self.bf16 = dtype == torch.bfloat16
        # accelerate's state is one per process, so its settings must not vary between calls: bf16
        # autocast is applied here (``autocast``), not through Accelerator(mixed_precision=...)
        self.accelerator = Accelerator(cpu=device == "cpu")
        self.world, self.rank = self.accelerator.num_processes, self.accelerator.process_index
        self.device = self.accelerator.device
        self.main = self.accelerator.is_main_process

    def wrap(self, model):
        """The module the forward and backward passes go through: DDP with several processes, else
        ``model`` itself (accelerate decides). The unwrapped ``model`` keeps the same Parameters."""
        return self.accelerator.prepare_model(model)

    def close(self) -> None:
        """End the process group of a multi-process run (nothing with one process)."""
        if self.world > 1:
            torch.distributed.destroy_process_group()

    def autocast(self):
        """bf16 autocast of the forward pass when bf16 is on (weights and optimizer state stay fp32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def _reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        if self.world == 1:
            return t
        t = t.detach().clone()
        torch.distributed.all_reduce(t, op=op)
        return t

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, torch.distributed.ReduceOp.SUM)

    def all_max(self, t: torch.Tensor) -> torch.Tensor:
        return self._reduce(t, torch.distributed.ReduceOp.MAX)

    def sum_over_shards(self, t: torch.Tensor) -> torch.Tensor:
        """A sum over a weight's pieces held by different processes (norms of selected slices, their dot
        products). Under DDP every process holds whole weights and identical gradients, so this is the
        identity; a sharded engine (FSDP) sums the local parts over its processes."""
        return t

    def average_gradients(self, weights) -> None:
        """Average ``.grad`` of weights DDP does not track (frozen LoRA base weights on ShaPO steps)."""
        if self.world > 1:
            for w in weights:
                torch.distributed.all_reduce(w.grad)
                w.grad /= self.world

    def share(self, idx: np.ndarray) -> np.ndarray:
        """This process's part of a global batch (contiguous, sizes differing by at most one)."""
        return np.array_split(idx, self.world)[self.rank]

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()
