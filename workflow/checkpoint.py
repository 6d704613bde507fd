"""Atomic training checkpoints, so a killed ``train_policy`` job resumes where it stopped.

A checkpoint is a folder: ``model.safetensors`` (weights), ``optimizer.pt`` (optimizer and
scheduler state and the torch RNG: tensors and numbers only, read back with
``weights_only=True``) and ``state.json`` (step, epoch, the epoch's batch order, the numpy and
Python RNG states, the log so far, and a fingerprint of the job's inputs). It is written under
``<name>.tmp`` and renamed, so a job killed while saving keeps its previous checkpoint. A
checkpoint whose fingerprint differs (other data, method, settings or seed) is ignored.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model

from workflow.files import atomic_dir, read_json, write_json


def fingerprint(*parts) -> str:
    """Hash of the JSON-able inputs that determine a training run."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class Checkpointer:
    """Saves every ``every`` steps into ``folder``; ``every = 0`` turns checkpointing off."""

    def __init__(self, folder, every: int, key: str):
        self.folder, self.every, self.key = Path(folder), every, key

    def due(self, step: int, total: int) -> bool:
        return self.every > 0 and step % self.every == 0 and step < total

    def save(self, model, optimizer, scheduler, state: dict, rngs: tuple[np.random.Generator, random.Random]) -> None:
        np_rng, py_rng = rngs
        with atomic_dir(self.folder) as tmp:
            save_model(model, str(tmp / "model.safetensors"))  # handles tied embeddings
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "torch_rng": torch.get_rng_state()}, tmp / "optimizer.pt")
            write_json(tmp / "state.json", {**state, "key": self.key, "numpy_rng": np_rng.bit_generator.state,
                                            "python_rng": py_rng.getstate()})

    def load(self, model, optimizer, scheduler, rngs: tuple[np.random.Generator, random.Random]) -> dict | None:
        """Restore everything in place and return the saved state, or None when there is nothing to resume."""
        if not (self.folder / "state.json").exists():
            return None
        state = read_json(self.folder / "state.json")
        if state.get("key") != self.key:
            print(f"ignoring checkpoint {self.folder}: it belongs to other inputs or settings", flush=True)
            return None
        load_model(model, str(self.folder / "model.safetensors"))
        saved = torch.load(self.folder / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        np_rng, py_rng = rngs
        np_rng.bit_generator.state = state["numpy_rng"]
        version, internal, gauss = state["python_rng"]
        py_rng.setstate((version, tuple(internal), gauss))
        return state

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
