"""Atomic training checkpoints, so a killed ``train_policy`` job resumes where it stopped.

A checkpoint is a folder: ``model.safetensors`` (weights), ``optimizer.pt`` (optimizer and
scheduler state and the torch RNGs, CPU and CUDA: tensors and numbers only, read back with
``weights_only=True``) and ``state.json`` (step, epoch, the epoch's batch order, the numpy and
Python RNG states, the log so far, and a fingerprint of the job's inputs). It is written under
``<name>.tmp`` and renamed, so a job killed while saving keeps its previous checkpoint. A
checkpoint whose fingerprint differs (other data, method, settings or seed) is ignored.

Sharded training (``training.parallel: fsdp``) uses ``ShardedCheckpointer``: every process writes its
own rows of the weights and of the optimizer state with ``torch.distributed.checkpoint`` (DCP) into
``sharded/``, so no process gathers the model; ``optimizer.pt`` then holds the scheduler and the torch
RNG only. The folder is atomic in the same way (process 0 creates ``<name>.tmp`` and renames it once
every process has written).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from workflow.lib.files import atomic_dir, read_json, write_json


def fingerprint(*parts) -> str:
    """Hash of the JSON-able inputs that determine a training run."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class Checkpointer:
    """Saves every ``every`` steps into ``folder``; ``every = 0`` turns checkpointing off. Process 0
    saves alone (every process holds the same weights); ``main``: whether this is process 0, the one that
    prints what every process would repeat."""

    collective = False  # whether every process calls save (ShardedCheckpointer)

    def __init__(self, folder, every: int, key: str, main: bool = True):
        self.folder, self.every, self.key, self.main = Path(folder), every, key, main

    def due(self, step: int, total: int) -> bool:
        return self.every > 0 and step % self.every == 0 and step < total

    def save(self, model, optimizer, scheduler, state: dict, rngs: tuple[np.random.Generator, random.Random]) -> None:
        np_rng, py_rng = rngs
        with atomic_dir(self.folder) as tmp:
            save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        **torch_rng_states()}, tmp / "optimizer.pt")
            write_json(tmp / "state.json", {**state, "key": self.key, "numpy_rng": np_rng.bit_generator.state,
                                            "python_rng": py_rng.getstate()})

    def load(self, model, optimizer, scheduler, rngs: tuple[np.random.Generator, random.Random]) -> dict | None:
        """Restore everything in place and return the saved state, or None when there is nothing to resume."""
        state = self.matching_state()
        if state is None:
            return None
        load_model(model, str(self.folder / "model.safetensors"))
        saved = torch.load(self.folder / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        restore_rest(saved, scheduler, state, rngs)
        return state

    def matching_state(self) -> dict | None:
        """The saved state.json if it belongs to this run, else None (nothing saved, or other inputs)."""
        if not (self.folder / "state.json").exists():
            return None
        state = read_json(self.folder / "state.json")
        if state.get("key") != self.key:
            if self.main:
                print(f"ignoring checkpoint {self.folder}: it belongs to other inputs or settings", flush=True)
            return None
        return state

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def torch_rng_states() -> dict:
    """The torch generators a resumed run must continue: the CPU one and, when CUDA is present, this process's
    GPU's (tensors only, so ``torch.load(weights_only=True)`` reads them back). Every process of a run is seeded
    alike and draws alike on its own GPU, so process 0's state is every process's."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.empty(0, dtype=torch.uint8)
    return {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda}


def restore_rest(saved: dict, scheduler, state: dict, rngs: tuple[np.random.Generator, random.Random]) -> None:
    """Scheduler, torch RNG and the numpy / Python RNGs of a checkpoint."""
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    cuda = saved.get("cuda_rng")
    if cuda is not None and cuda.numel() and torch.cuda.is_available():  # dropout on the GPU draws from it
        torch.cuda.set_rng_state(cuda)
    np_rng, py_rng = rngs
    np_rng.bit_generator.state = state["numpy_rng"]
    version, internal, gauss = state["python_rng"]
    py_rng.setstate((version, tuple(internal), gauss))


class ShardedCheckpointer(Checkpointer):
    """Checkpoints of sharded training: weights and optimizer state written by every process (DCP).

    ``save`` and ``load`` are collectives: every process of ``parallel`` calls them. The step, batch
    order and RNG states are the same on every process, so process 0's are saved.
    """

    collective = True

    def __init__(self, folder, every: int, key: str, parallel):
        super().__init__(folder, every, key, parallel.main)
        self.parallel = parallel

    def save(self, model, optimizer, scheduler, state: dict, rngs: tuple[np.random.Generator, random.Random]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        np_rng, py_rng = rngs
        main = self.parallel.main
        # process 0 owns the atomic folder; the others write into the same <name>.tmp
        with atomic_dir(self.folder) if main else contextlib.nullcontext(self.folder.with_name(self.folder.name + ".tmp")) as tmp:
            self.parallel.barrier()  # the empty folder exists before anyone writes
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp / "sharded"))
            self.parallel.barrier()  # every process's files are written before the folder is renamed
            if main:
                torch.save({"scheduler": scheduler.state_dict(), **torch_rng_states()}, tmp / "optimizer.pt")
                write_json(tmp / "state.json", {**state, "key": self.key, "numpy_rng": np_rng.bit_generator.state,
                                                "python_rng": py_rng.getstate(), "processes": self.parallel.world})
        self.parallel.barrier()  # nobody goes on (or is killed) believing in a checkpoint not yet in place

    def load(self, model, optimizer, scheduler, rngs: tuple[np.random.Generator, random.Random]) -> dict | None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        state = self.matching_state()  # every process reads the same file, so all resume or none
        if state is None:
            return None
        model_state, optimizer_state = get_state_dict(model, optimizer)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(loaded, checkpoint_id=str(self.folder / "sharded"))
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
        restore_rest(torch.load(self.folder / "optimizer.pt", weights_only=True), scheduler, state, rngs)
        return state


def make_checkpointer(folder, every: int, key: str, parallel) -> Checkpointer:
    """The checkpointer of ``parallel``'s engine: sharded (DCP) under fsdp, else one file per part."""
    if parallel.sharded:
        return ShardedCheckpointer(folder, every, key, parallel)
    return Checkpointer(folder, every, key, parallel.main)
