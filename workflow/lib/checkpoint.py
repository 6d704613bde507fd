"""Atomic training checkpoints, so a killed ``train_policy`` job resumes where it stopped.

A checkpoint is a folder: ``model.safetensors`` (weights), ``optimizer.pt`` (optimizer and
scheduler state and the torch RNGs, CPU and CUDA: tensors and numbers only, read back with
``weights_only=True``) and ``state.json`` (step, epoch, the epoch's batch order, the numpy and
Python RNG states, the log so far, and a fingerprint of the job's inputs). It is written under
``<name>.tmp`` and renamed, so a job killed while saving keeps its previous checkpoint. A
checkpoint whose fingerprint differs (other data, method, settings or seed) is ignored.

A checkpoint that cannot be trusted is set aside, never deleted: state.json records the size and SHA-256 of
every other file in the folder, and a state.json that cannot be read, or a file that is missing or differs
(truncated by a full disk, garbage left by a crashed node), makes ``load`` rename the folder to
``<name>.damaged`` (``.damaged.2``, ...), say so in the job's log, and return None, so training starts
again from step 0 and the job completes. Nothing is loaded before every file is checked, so a damaged file
never leaves the model half-restored. With several processes every process checks its share of the files and
they agree (the worst verdict wins) before any of them resumes.

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
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from workflow.lib.files import atomic_dir, fsync_dir, read_json, write_json


def fingerprint(*parts) -> str:
    """Hash of the JSON-able inputs that determine a training run."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def file_records(folder: Path, names: list[str]) -> dict[str, dict]:
    """Size and SHA-256 of each file ``names`` (relative to ``folder``), read in 16 MiB blocks."""
    records = {}
    for name in names:
        digest = hashlib.sha256()
        with open(folder / name, "rb") as f:
            while block := f.read(1 << 24):
                digest.update(block)
        records[name] = {"bytes": (folder / name).stat().st_size, "sha256": digest.hexdigest()}
    return records


def damaged_file(folder: Path, records: dict[str, dict]) -> str | None:
    """Why the first of ``records`` that does not match its file (missing, other size, other SHA-256) cannot
    be trusted, or None when all match."""
    for name, record in records.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != record["bytes"]:
            return f"{name} has {size} bytes, {record['bytes']} were written"
        if file_records(folder, [name])[name]["sha256"] != record["sha256"]:
            return f"{name} differs from what was written (SHA-256)"
    return None


def set_aside(folder: Path) -> Path:
    """Rename ``folder`` to the first free ``<name>.damaged``, ``<name>.damaged.2``, ... and return the new path."""
    n, target = 1, folder.with_name(folder.name + ".damaged")
    while target.exists():
        n += 1
        target = folder.with_name(f"{folder.name}.damaged.{n}")
    folder.rename(target)
    fsync_dir(folder.parent)
    return target


# Verdicts on a checkpoint folder, ordered: processes that differ agree on the largest (any damaged copy wins)
RESUME, ABSENT, OTHER_RUN, DAMAGED = 0, 1, 2, 3


class Checkpointer:
    """Saves every ``every`` steps into ``folder``; ``every = 0`` turns checkpointing off. Process 0
    saves alone (every process holds the same weights); ``main``: whether this is process 0, the one that
    prints what every process would repeat. ``parallel`` (``workflow.lib.parallel``): the processes that
    must agree on resuming (each checks its share of the files); None for a run of one process."""

    collective = False  # whether every process calls save (ShardedCheckpointer)

    def __init__(self, folder, every: int, key: str, main: bool = True, parallel=None):
        self.folder, self.every, self.key, self.main, self.parallel = Path(folder), every, key, main, parallel

    def due(self, step: int, total: int) -> bool:
        return self.every > 0 and step % self.every == 0 and step < total

    def save(self, model, optimizer, scheduler, state: dict, rngs: tuple[np.random.Generator, random.Random]) -> None:
        np_rng, py_rng = rngs
        with atomic_dir(self.folder) as tmp:
            save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        **torch_rng_states()}, tmp / "optimizer.pt")
            write_json(tmp / "state.json", {**state, "key": self.key, "numpy_rng": np_rng.bit_generator.state,
                                            "python_rng": py_rng.getstate(),
                                            "files": file_records(tmp, ["model.safetensors", "optimizer.pt"])})

    def load(self, model, optimizer, scheduler, rngs: tuple[np.random.Generator, random.Random]) -> dict | None:
        """Restore everything in place and return the saved state, or None when there is nothing to resume
        (nothing saved, other inputs, or a damaged checkpoint, which is set aside)."""
        state = self.matching_state()
        if state is None:
            return None
        load_model(model, str(self.folder / "model.safetensors"))
        saved = torch.load(self.folder / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        restore_rest(saved, scheduler, state, rngs)
        return state

    def matching_state(self) -> dict | None:
        """The saved state.json if it belongs to this run and every file of the checkpoint is intact, else None
        (nothing saved, other inputs, or damaged: then the folder is set aside and the log says why). With
        several processes, a collective: they agree before any of them resumes."""
        state, verdict, why = self._inspect()
        verdict = self._agree(verdict)
        if verdict == DAMAGED:
            if why:  # the process that found the damage names it
                print(f"checkpoint {self.folder} is damaged: {why}", flush=True)
            self._barrier()  # every process has finished reading the folder
            if self.main:
                moved = set_aside(self.folder)
                print(f"set aside damaged checkpoint {self.folder} as {moved.name} (kept for inspection); "
                      "training starts again from step 0", flush=True)
            self._barrier()  # the folder is out of the way before anyone saves a new checkpoint there
            return None
        if verdict == OTHER_RUN and self.main:
            print(f"ignoring checkpoint {self.folder}: it belongs to other inputs or settings", flush=True)
        return state if verdict == RESUME else None

    def _inspect(self) -> tuple[dict | None, int, str]:
        """(state, verdict, why) of this process's look at the folder: state.json, then its share of the
        files that state.json lists."""
        path = self.folder / "state.json"
        if not path.exists():
            return None, ABSENT, ""
        try:
            state = read_json(path)
        except (OSError, ValueError) as e:  # a truncated or garbled file (JSONDecodeError, UnicodeDecodeError)
            return None, DAMAGED, f"state.json cannot be read ({type(e).__name__}: {e})"
        if not isinstance(state, dict):
            return None, DAMAGED, "state.json does not hold a checkpoint's state"
        if state.get("key") != self.key:
            return None, OTHER_RUN, ""
        if not isinstance(state.get("files"), dict):
            return None, DAMAGED, "state.json lists no files to check (written by an older version)"
        rank, world = (self.parallel.rank, self.parallel.world) if self.parallel else (0, 1)
        names = sorted(state["files"])[rank::world]
        why = damaged_file(self.folder, {name: state["files"][name] for name in names})
        return (None, DAMAGED, why) if why else (state, RESUME, "")

    def _agree(self, verdict: int) -> int:
        if self.parallel is None or self.parallel.world == 1:
            return verdict
        return int(self.parallel.all_max(torch.tensor(verdict, device=self.parallel.device)).item())

    def _barrier(self) -> None:
        if self.parallel is not None:
            self.parallel.barrier()

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
        super().__init__(folder, every, key, parallel.main, parallel)

    def save(self, model, optimizer, scheduler, state: dict, rngs: tuple[np.random.Generator, random.Random]) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        np_rng, py_rng = rngs
        main, rank, world = self.parallel.main, self.parallel.rank, self.parallel.world
        # process 0 owns the atomic folder; the others write into the same <name>.tmp
        staged = self.folder.with_name(self.folder.name + ".tmp")
        with atomic_dir(self.folder) if main else contextlib.nullcontext(staged) as tmp:
            self.parallel.barrier()  # the empty folder exists before anyone writes
            model_state, optimizer_state = get_state_dict(model, optimizer)
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp / "sharded"))
            self.parallel.barrier()  # every process's files are written before the folder is renamed
            # each process hashes its share of the shard files (one process reading them all would take as
            # long as writing them did) and leaves the records for process 0
            write_json(tmp / f"files.{rank}.json", file_records(tmp, shard_files(tmp)[rank::world]))
            self.parallel.barrier()
            if main:
                torch.save({"scheduler": scheduler.state_dict(), **torch_rng_states()}, tmp / "optimizer.pt")
                files = file_records(tmp, ["optimizer.pt"])
                for r in range(world):
                    files |= read_json(tmp / f"files.{r}.json")
                    os.remove(tmp / f"files.{r}.json")
                # a file some process did not list (a shared file system's stale listing) is hashed here
                files |= file_records(tmp, [name for name in shard_files(tmp) if name not in files])
                write_json(tmp / "state.json", {**state, "key": self.key, "numpy_rng": np_rng.bit_generator.state,
                                                "python_rng": py_rng.getstate(), "processes": world, "files": files})
        self.parallel.barrier()  # nobody goes on (or is killed) believing in a checkpoint not yet in place

    def load(self, model, optimizer, scheduler, rngs: tuple[np.random.Generator, random.Random]) -> dict | None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        state = self.matching_state()  # a collective: all resume or none
        if state is None:
            return None
        model_state, optimizer_state = get_state_dict(model, optimizer)
        loaded = {"model": model_state, "optimizer": optimizer_state}
        dcp.load(loaded, checkpoint_id=str(self.folder / "sharded"))
        set_state_dict(model, optimizer, model_state_dict=loaded["model"], optim_state_dict=loaded["optimizer"])
        restore_rest(torch.load(self.folder / "optimizer.pt", weights_only=True), scheduler, state, rngs)
        return state


def shard_files(folder: Path) -> list[str]:
    """The files DCP wrote under ``folder/sharded``, relative to ``folder``, sorted (every process's same list)."""
    return sorted(str(p.relative_to(folder)) for p in (folder / "sharded").rglob("*") if p.is_file())


def make_checkpointer(folder, every: int, key: str, parallel) -> Checkpointer:
    """The checkpointer of ``parallel``'s engine: sharded (DCP) under fsdp, else one file per part."""
    if parallel.sharded:
        return ShardedCheckpointer(folder, every, key, parallel)
    return Checkpointer(folder, every, key, parallel.main, parallel)
