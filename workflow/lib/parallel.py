"""Parallel training: this process's device, precision, rank and world size, how the model is wrapped,
and the reductions the training loop needs across processes. ``make_parallel`` picks the engine by
``training.parallel``:

``ddp`` (``DataParallel``): every process holds the whole model. Under ``torchrun --nproc_per_node N``
(the ``train_policy`` rule launches it for ``training.devices: N``) accelerate sets up the process
group (gloo on CPUs, NCCL on GPUs) and the device; the model is wrapped in DDP. With one process every
reduction is the identity, so the loop is the plain one-process loop.

``fsdp`` (``FullyShardedParallel``): PyTorch's FSDP2 (``fully_shard``), one unit per decoder layer plus
the root. Every weight, its gradient and its optimizer state are split along dim 0 over the processes;
a layer's weights are all-gathered only for its forward and backward. Plain ``torch.distributed``
(accelerate is not needed: it would only forward to ``fully_shard``). Both classes have the same
interface, so ``workflow.lib.train_step`` does not branch on the engine.
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
import torch

from workflow.lib import models
from workflow.lib.models import placement

ENGINES = ("ddp", "fsdp")
# set once this process has started a process group: ``exit_past_interpreter_shutdown`` reads it
_started_group = False


def make_parallel(settings: dict):
    """The engine of ``training.parallel`` for ``training.precision`` (``settings``: the validated section)."""
    kind = settings["parallel"]
    if kind == "fsdp":
        return FullyShardedParallel(settings["precision"])
    if kind == "ddp":
        return DataParallel(settings["precision"])
    raise ValueError(f"training.parallel: {kind!r}; expected one of {ENGINES}")


class Collectives:
    """Reductions over the processes of a run, shared by both engines (the identity with one process)."""

    world: int

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


class DataParallel(Collectives):
    """This process's place in (data-parallel) training: device, precision, rank and world size.

    accelerate sets up the device and, under torchrun, the process group; with one process
    (world 1) the reductions are the identity and the loop is the plain one-process loop.
    """

    sharded = False  # every process holds whole weights

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
        if self.world > 1:
            _note_group_started()

    def load_model(self, folder):
        """The fp32 model of ``folder`` for ``wrap``: every process holds the whole model, so each reads it."""
        return models.load_model(folder)

    def wrap(self, model):
        """The module the forward and backward passes go through: DDP with several processes, else
        ``model`` itself (accelerate decides); ``model`` is moved to this process's device first. The
        unwrapped ``model`` keeps the same Parameters."""
        return self.accelerator.prepare_model(model.to(self.device))

    def bind(self, selected) -> None:
        """Point the selected neurons at the weights the wrapped model trains (the same Parameters here),
        with their indices on the weights' device (in place)."""
        for s in selected or ():
            s.index = s.index.to(s.weight.device)

    def full_state_dict(self, model):
        """The whole model's weights for saving, on process 0: None here (``model`` holds them itself)."""
        return None

    def close(self) -> None:
        """End the process group of a multi-process run (nothing with one process), once every process
        has finished its collectives."""
        if self.world > 1:
            self.barrier()
            torch.distributed.destroy_process_group()

    def autocast(self):
        """bf16 autocast of the forward pass when bf16 is on (weights and optimizer state stay fp32)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

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


class FullyShardedParallel(Collectives):
    """This process's place in sharded training (FSDP2): the same interface as ``DataParallel``.

    Under torchrun the process group comes from torchrun's environment (NCCL for GPU tensors and gloo
    for CPU ones on GPUs; gloo on CPUs); run alone it is a group of one, so one process trains through
    the same code. ``wrap`` shards the model in place: its Parameters are replaced by DTensors holding
    this process's rows (dim 0), which is why the selected neurons are re-bound (``bind``) and the
    optimizer is built after wrapping. With bf16 (``training.precision``) parameters are all-gathered
    and computed in bf16 while the sharded fp32 weights stay the master copy, gradients are
    reduce-scattered in fp32, and the optimizer state is fp32 (``MixedPrecisionPolicy``).
    """

    sharded = True

    def __init__(self, precision: str = "auto"):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        device, dtype = placement(precision)  # the same precision rule as every stage
        self.bf16 = dtype == torch.bfloat16
        if device == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.owns_group = not dist.is_initialized()
        if self.owns_group:
            # NCCL reduces GPU tensors; gloo the CPU ones (a scalar sum, DCP's planning) on the same group
            backend = "cuda:nccl,cpu:gloo" if device == "cuda" else "gloo"
            if "WORLD_SIZE" in os.environ:  # torchrun (or srun + torchrun): rendezvous from the environment
                dist.init_process_group(backend)
            else:  # one process, no launcher: a group of one
                dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
            _note_group_started()
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.main = self.rank == 0
        self.mesh = init_device_mesh(self.device.type, (self.world,))
        self._renamed: dict[int, str] = {}
        self._params: dict[str, torch.nn.Parameter] = {}
        self._weights: dict[str, torch.Tensor] | None = None  # process 0's full weights until ``wrap`` sends them

    def load_model(self, folder):
        """The fp32 model of ``folder`` for ``wrap``, read once per run rather than once per process: every process
        builds it on the meta device (``models.empty_model``: no memory), and only process 0 reads the weights
        (``models.load_model``), which ``wrap`` sends out row by row once the model is sharded. The parameters
        exist by identity (the selected neurons bind to them) but have no values before ``wrap``."""
        model = models.empty_model(folder)
        if self.main:
            full = models.load_model(folder)
            self._weights = full.state_dict()  # the tensors outlive the module: one copy, on process 0 only
            del full
        return model

    def wrap(self, model):
        """Shard ``model`` in place (one FSDP unit per decoder layer, then the root) and return it.

        The parameters move to this process's device shard by shard (``fully_shard`` does it), so a
        GPU never holds the whole fp32 model. A model from ``load_model`` (on the meta device) is then
        given its values (``_fill``)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if self.bf16
                  else MixedPrecisionPolicy())
        self._renamed = {id(p): name for name, p in model.named_parameters()}
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=self.mesh, mp_policy=policy)
        fully_shard(model, mesh=self.mesh, mp_policy=policy)
        if any(p.is_meta for p in model.parameters()):
            self._fill(model)
        self._params = dict(model.named_parameters())
        self._tied = tied_parameter_names(model)
        return model

    def _fill(self, model) -> None:
        """Give a sharded model built on the meta device its values: memory for this process's rows on its device
        (``to_empty``), the buffers computed at construction put back (``to_empty`` leaves them uninitialised, and
        the non-persistent ones, rotary frequencies, are in no state dict), then process 0's weights broadcast one
        tensor at a time, each process keeping its rows (``set_model_state_dict(broadcast_from_rank0=True)``), so
        no other process holds more than one whole tensor at a time."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        if self.main and self._weights is None:
            raise RuntimeError("a model on the meta device needs its weights: build it with "
                               "FullyShardedParallel.load_model")
        buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
        model.to_empty(device=self.device)
        with torch.no_grad():
            for name, value in buffers.items():
                model.get_buffer(name).copy_(value)
        set_model_state_dict(model, self._weights if self.main else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        self._weights = None

    def bind(self, selected) -> None:
        """Point the selected neurons at the sharded weights (in place), with indices into this process's
        rows: down_proj-style weights (neurons along dim 1) keep every index, since each process holds
        some rows of every column; weights whose neurons lie along dim 0 (GPT-2's Conv1D, ``subspace:
        full``) keep the neurons in this process's row range, as local row numbers."""
        for s in selected or ():
            if id(s.weight) not in self._renamed:
                raise RuntimeError("selected neurons must be bound to the model before it is wrapped")
            weight = self._params[self._renamed[id(s.weight)]]
            index = s.index
            if s.axis == 0:
                start, rows = shard_rows(weight.shape[0], self.world, self.rank)
                if rows != weight.to_local().shape[0]:
                    raise RuntimeError(f"unexpected FSDP shard of {tuple(weight.shape)}: {weight.to_local().shape[0]} "
                                       f"rows on process {self.rank}, expected {rows}")
                index = index[(index >= start) & (index < start + rows)] - start
            s.weight, s.index = weight, index.to(self.device)

    def full_state_dict(self, model) -> dict:
        """Every weight gathered in full to process 0's CPU memory (empty on the other processes): a
        collective, every process must call it. Tied weights (input and output embeddings) share one
        tensor, so ``save_pretrained`` writes them once, as it does for an unsharded model."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.main:
            for first, others in self._tied.items():
                for name in others:
                    if first in state and name in state:
                        state[name] = state[first]
        return state

    def close(self) -> None:
        """End the process group this engine started, once every process has finished its collectives."""
        if self.owns_group:
            self.barrier()
            torch.distributed.destroy_process_group()

    def autocast(self):
        """bf16 autocast on top of the bf16 parameters (as under DDP): ops autocast keeps in fp32
        (log-softmax, reductions) stay fp32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def sum_over_shards(self, t: torch.Tensor) -> torch.Tensor:
        """A sum over a weight's pieces: each process passes the sum over its own rows (of a norm, a dot
        product); the all-reduced total is the same on every process."""
        t = torch.as_tensor(t)  # float64 sums (the step diagnostics) stay float64; others are reduced in fp32
        return self._reduce(t if t.dtype == torch.float64 else t.float(), torch.distributed.ReduceOp.SUM)

    def average_gradients(self, weights) -> None:
        """Nothing to do: FSDP reduce-scatters every trainable weight's gradient, and frozen weights
        (LoRA) are refused under fsdp."""
        if list(weights):
            raise RuntimeError("training.parallel fsdp does not train with frozen perturbed weights (LoRA)")

    def share(self, idx: np.ndarray) -> np.ndarray:
        """This process's part of a global batch (contiguous, sizes differing by at most one)."""
        return np.array_split(idx, self.world)[self.rank]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def _note_group_started() -> None:
    global _started_group
    _started_group = True


def exit_past_interpreter_shutdown() -> None:
    """End a training process that started a process group now, with exit status 0, without Python's
    interpreter shutdown; return (nothing to do) in a process that started none. Call it last, from
    ``__main__`` only, once the stage has written its outputs and closed the group.

    Why: FSDP (and DDP) keep the process group alive past ``destroy_process_group`` (gloo's worker
    threads are still running at exit, torch 2.13), and a native thread that touches Python while the
    interpreter shuts down aborts the process ("terminate called without an active exception",
    SIGABRT). torchrun then fails the job, and Snakemake deletes its outputs, after a run that had
    finished: this happened to one of the 36 two-process jobs of a CI rehearsal (docs/scale-out.md).
    Standard streams are flushed first; the stage's files are already closed.
    """
    if not _started_group:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's decoder layers (transformers names their class in ``_no_split_modules``: the unit
    it never splits across devices), each one FSDP unit."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"training.parallel fsdp: no decoder layers found in {type(model).__name__} "
                         f"(looked for modules of class {sorted(names) or 'named in _no_split_modules'})")
    return layers


def tied_parameter_names(model) -> dict[str, list[str]]:
    """First name of every parameter registered under several names -> its other names."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {names[0]: names[1:] for names in by_id.values() if len(names) > 1}


def shard_rows(n: int, world: int, rank: int) -> tuple[int, int]:
    """(first row, rows) of process ``rank``'s shard of a dim of size ``n``: FSDP2 splits dim 0 like
    ``torch.chunk``, ceil(n / world) rows each, the last processes holding fewer (or none)."""
    size = math.ceil(n / world)
    start = min(rank * size, n)
    return start, min(size, n - start)
