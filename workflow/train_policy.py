"""Preference-train a policy with DPO, token-level or reward-level ShaPO on a (noisy) preference set.

    python -m workflow.train_policy --model results/models/base --pairs results/data/noisy/noise0.4/seed0.jsonl \
        --reference results/data/preferences/reference_logps.jsonl --subspace results/subspace/neurons.safetensors \
        --method-json '{"loss": "dpo", "beta": 0.1, "sharpness": {"interval": 5, "gamma_min": 2e-6, "gamma_max": 4e-6}}' \
        --training-json '{"batch_size": 4, "epochs": 1, "lr": 5e-6}' --prompt-format auto --seed 0 \
        --output results/policies/shapo/noise0.4/seed0 --train-log results/policies/shapo/noise0.4/seed0.tsv

Every ``interval``-th step of a method with ``sharpness`` is sharpness-aware: gradients at θ,
the perturbed weights (``subspace``: probe-selected neurons, random, uniform or all) moved
uphill (``raw`` γ·g with γ ~ U[γ_min, γ_max], ``normalized`` ρ·g/‖g‖, or ``matched``: as far as the
raw probe-subspace move would go), loss and gradients again at that point, weights restored exactly,
and the optimizer step taken with the second gradients. Each sharpness-aware step logs whether the
move changed anything (``train_step.SHARPNESS_COLUMNS``). A method with ``reward_labels`` is
reward-level: each pair's label is the soft label p = σ(β_r·(r_chosen − r_rejected)) from
``--rewards`` (workflow.reward_model) and the loss the cross-entropy between p and σ(β·h).
Checkpoints every ``checkpoint_every`` steps let a killed job resume.
The JSON settings are config slices; keys left out take the schema's defaults (``workflow.lib.config``).
One optimizer step is ``workflow.lib.train_step.train_step``; this module is the loop around it.

Runs on a GPU when one is visible (``precision: auto`` = bf16 autocast there, fp32 on CPU). Under
``torchrun --nproc_per_node N`` (the rule does this for ``training.devices: N``) it trains data-parallel
through accelerate (DDP; gloo on CPU, NCCL on GPUs): each global batch is split over the processes,
gradients are averaged before the perturbation, so every process moves the same selected columns by
the same amount, and the result equals a one-process run on the whole batch (Dr.DPO included, see
``losses.data_parallel_reduction``). Only process 0 writes checkpoints and outputs.

With ``training.parallel: fsdp`` the processes shard the model instead of copying it (FSDP2, see
``workflow.lib.parallel``): each holds some rows of every weight, gradient and optimizer state, the ShaPO
move is applied to each process's rows of the selected columns, checkpoints are sharded
(``checkpoint.ShardedCheckpointer``), and the final weights are gathered once to process 0, which
writes the same safetensors folder as above. The batches, reductions and results are the same.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from workflow.lib import loop
from workflow.lib.checkpoint import Checkpointer, file_digest, fingerprint, make_checkpointer
from workflow.lib.checks import check_preset, check_training
from workflow.lib.config import fill_defaults
from workflow.lib.files import atomic_dir, read_jsonl, write_json, write_tsv
from workflow.lib.losses import soft_labels
from workflow.lib.models import PROVENANCE, load_tokenizer
from workflow.lib.optim import make_optimizer
from workflow.lib.pairs import collate_pairs, encode_response_pair, text_key
from workflow.lib.parallel import DataParallel, FullyShardedParallel, exit_past_interpreter_shutdown, make_parallel
from workflow.lib.presets import uses_reward
from workflow.lib.sharpness import matched_reference, perturbed_set
from workflow.lib.train_step import LOG_COLUMNS, SHARPNESS_COLUMNS, Trainer, train_step

SAVE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def attach_reference(records: list[dict], reference_rows: list[dict], path: str) -> None:
    """Add ``ref_chosen``/``ref_rejected`` to each record, looked up by pair id and answer text."""
    by_id = {r["pair_id"]: r["logps"] for r in reference_rows}
    for r in records:
        logps = by_id.get(r["pair_id"], {})
        try:
            r["ref_chosen"], r["ref_rejected"] = logps[text_key(r["chosen"])], logps[text_key(r["rejected"])]
        except KeyError:
            raise ValueError(f"{path}: no reference log-probs for pair {r['pair_id']!r}; rerun reference_logps") from None


def attach_soft_labels(records: list[dict], reward_rows: list[dict], beta_r: float, path: str) -> None:
    """Add ``soft_label`` p = σ(β_r·(r_chosen − r_rejected)) to each record, in the record's own orientation.

    The reward file scores the clean pairs; noise swaps chosen and rejected of the ``flipped``
    pairs, so their rewards are swapped too (the reward model does not see the noise). The
    answers' text keys are checked, so a reward file of other pairs fails here.
    """
    by_id = {r["pair_id"]: r for r in reward_rows}
    for r in records:
        row = by_id.get(r["pair_id"])
        if row is None:
            raise ValueError(f"{path}: no rewards for pair {r['pair_id']!r}; rerun train_reward_model")
        r_chosen, r_rejected, keys = row["r_chosen"], row["r_rejected"], (row["chosen_key"], row["rejected_key"])
        if r.get("flipped", False):
            r_chosen, r_rejected, keys = r_rejected, r_chosen, keys[::-1]
        if keys != (text_key(r["chosen"]), text_key(r["rejected"])):
            raise ValueError(f"{path}: pair {r['pair_id']!r} was scored with other answers; rerun train_reward_model")
        r["soft_label"] = float(soft_labels(torch.tensor(r_chosen), torch.tensor(r_rejected), beta_r))


def apply_lora(model, lora: dict):
    """Wrap the model with PEFT LoRA adapters (``r``, ``alpha``, ``target_modules``); only the adapters train.

    The base weights stay the same Parameter objects, so neurons selected before wrapping still
    point at them. ShaPO perturbs those base weights: the merged weight is W + (α/r)·B·A, linear in
    W, so ∂L/∂W equals the gradient with respect to the merged weight and moving W's selected
    columns moves the merged weight's columns identically, with nothing to merge per step.
    """
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], target_modules=list(lora["target_modules"]),
                        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class StepReport(loop.StepReport):
    """The policy's step report: a JSON line and a progress line in the job log, and TensorBoard scalars when
    ``tensorboard_dir`` is given (process 0 only)."""

    SCALARS = ("loss", "loss_perturbed", "margin", "acc_clean", "acc_flipped", "grad_norm", "lr", "gamma")

    def __init__(self, main: bool, tensorboard_dir: str | None = None):
        super().__init__(main, "train", ("step", "loss", "margin", "sharpness_step", "seconds"))
        self.writer = None
        if main and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(tensorboard_dir)

    def __call__(self, row: dict) -> None:
        super().__call__(row)
        if self.writer:
            for key in self.SCALARS:
                value = row.get(key)
                if value is not None and math.isfinite(value) and (key != "gamma" or row["sharpness_step"]):
                    self.writer.add_scalar(f"train/{key}", value, row["step"])
            if row["sharpness_step"]:
                self.writer.add_scalar("sharpness/delta_loss", row["loss_perturbed"] - row["loss"], row["step"])
                for key in SHARPNESS_COLUMNS:
                    if math.isfinite(row[key]):
                        self.writer.add_scalar(f"sharpness/{key}", row[key], row["step"])

    def close(self) -> None:
        super().close()
        if self.writer is not None:
            self.writer.close()


def train(model, tokenizer, records: list[dict], method: dict, settings: dict, seed: int, *, selected=None,
          matched_to=None, checkpointer: Checkpointer | None = None,
          parallel: DataParallel | FullyShardedParallel | None = None, tensorboard_dir: str | None = None):
    """Run the training loop; returns the per-step log as a list of dicts.

    ``settings`` is the validated ``training`` section (``workflow.lib.config.fill_defaults``). With a
    ``checkpointer`` the loop saves every few steps and first resumes from a matching checkpoint,
    restoring weights, optimizer, schedule, batch order and every RNG, so a resumed run ends with the
    same weights as an uninterrupted one (``workflow.lib.loop``). ``parallel`` places (or shards) the model
    and splits each batch over the processes (default: ``training.parallel`` in this process alone). ``selected``
    is bound to the weights the wrapped model trains, in place (under fsdp: the sharded ones). One step is
    ``train_step.train_step``. ``matched_to``: the probe-selected neurons a ``matched`` control copies
    the move length of (bound like ``selected``). Under fsdp ``model`` may come from
    ``FullyShardedParallel.load_model`` (on the meta device until wrapped).
    """
    parallel = parallel or make_parallel(settings)
    bs = settings["batch_size"]
    total = loop.total_steps(len(records), bs, settings["epochs"], parallel.world)
    if method.get("sharpness") and not selected:
        raise ValueError("sharpness-aware training needs a non-empty subspace")
    if method.get("sharpness", {}).get("perturbation") == "matched" and not matched_to:
        raise ValueError("sharpness.perturbation matched needs the probe-selected neurons (matched_to)")
    encoded = [encode_response_pair(tokenizer, r, settings["max_length"], settings["max_prompt_length"],
                                    settings["prompt_format"]) for r in records]
    # wrap first: FSDP replaces the Parameters by sharded ones, which the optimizer and ``selected`` must
    # hold (under DDP the unwrapped ``model`` keeps the Parameter objects the wrapper uses)
    forward = parallel.wrap(model)
    parallel.bind(selected)
    parallel.bind(matched_to)
    optimizer, scheduler = make_optimizer(model.parameters(), settings, total)
    trainer = Trainer(model, forward, optimizer, scheduler, method, settings, parallel, selected, random.Random(seed),
                      matched_to)

    def step(global_idx, local_idx, number: int) -> dict:
        batch = collate_pairs([encoded[i] for i in local_idx], tokenizer.pad_token_id)
        return train_step(trainer, batch, [records[i] for i in local_idx], [records[i] for i in global_idx], number)

    steps = loop.Loop(model, optimizer, scheduler, parallel, np.random.default_rng(seed), trainer.gamma_rng,
                      checkpointer)
    return steps.run(step, len(records), bs, settings["epochs"], StepReport(parallel.main, tensorboard_dir))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model folder (also the reference model)")
    p.add_argument("--pairs", required=True)
    p.add_argument("--reference", required=True, help="reference log-probs from workflow.reference_logps")
    p.add_argument("--subspace", help="neurons.safetensors from workflow.select_subspace (ShaPO methods)")
    p.add_argument("--rewards", help="pair_rewards.jsonl from workflow.reward_model (reward-level methods)")
    p.add_argument("--method-json", required=True, help="the method preset as JSON")
    p.add_argument("--training-json", required=True, help="the config's training section as JSON (defaults filled in)")
    p.add_argument("--prompt-format", required=True, choices=["auto", "chat", "hh"], help="config model.prompt_format")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--output", required=True, help="folder for the trained weights (safetensors)")
    # --train-log first: torchrun, which launches data-parallel runs, reads an abbreviated "--log" as its own --log-dir
    p.add_argument("--train-log", "--log", dest="log", required=True, help="per-step training log (TSV)")
    p.add_argument("--checkpoint", help="checkpoint folder (default: <output>.checkpoint); removed after success")
    p.add_argument("--tensorboard", help="also write TensorBoard event files to this folder (training.report_to)")
    a = p.parse_args(argv)
    method = fill_defaults(json.loads(a.method_json), "presets/*")
    settings = fill_defaults(json.loads(a.training_json), "training") | {"prompt_format": a.prompt_format}
    check_preset("<--method-json>", method)  # the checks of the config, for a job run by hand
    check_training(settings)
    if a.threads:  # the job's threads (per node), shared by the training processes on this node
        torch.set_num_threads(max(1, a.threads // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    torch.manual_seed(a.seed)

    parallel = make_parallel(settings)  # first: only its main process prints what every process would repeat
    if parallel.main:
        print(json.dumps({"parallel": settings["parallel"], "processes": parallel.world,
                          "device": str(parallel.device), "bf16": parallel.bf16}), flush=True)
    records = read_jsonl(a.pairs)
    attach_reference(records, read_jsonl(a.reference), a.reference)
    if uses_reward(method):
        if not a.rewards:
            raise ValueError("a reward-level method (reward_labels) needs the reward model's scores (--rewards)")
        attach_soft_labels(records, read_jsonl(a.rewards), method["reward_labels"]["beta_r"], a.rewards)
        flipped = np.array([bool(r.get("flipped", False)) for r in records])
        p = np.array([r["soft_label"] for r in records])
        if parallel.main:
            print(json.dumps({"soft_label_mean_clean": float(p[~flipped].mean()) if (~flipped).any() else None,
                              "soft_label_mean_flipped": float(p[flipped].mean()) if flipped.any() else None,
                              "flips_corrected": int((p[flipped] < 0.5).sum()), "n_flipped": int(flipped.sum())}),
                  flush=True)
    model = parallel.load_model(a.model)  # fsdp: process 0 alone reads the weights, sent out when wrapped
    selected = perturbed_set(model, method["sharpness"], a.subspace, a.seed) if method.get("sharpness") else None
    matched_to = matched_reference(model, method["sharpness"], a.subspace) if method.get("sharpness") else None
    if settings.get("lora"):
        model = apply_lora(model, settings["lora"])
    inputs = [file_digest(f) for f in (a.pairs, a.reference, a.subspace, a.rewards) if f]
    # settings that do not change the training (how often to save, where to log, the saved dtype) do not
    # invalidate a checkpoint
    kept = {k: v for k, v in settings.items() if k not in ("checkpoint_every", "report_to", "save_dtype")}
    key = fingerprint(method, kept, a.seed, inputs, str(Path(a.model).resolve()))
    checkpointer = make_checkpointer(a.checkpoint or f"{a.output.rstrip('/')}.checkpoint", settings["checkpoint_every"],
                                     key, parallel)
    log = train(model, load_tokenizer(a.model), records, method, settings, a.seed, selected=selected,
                matched_to=matched_to, checkpointer=checkpointer, parallel=parallel, tensorboard_dir=a.tensorboard)
    weights = parallel.full_state_dict(model)  # fsdp: gathered to process 0 (a collective); ddp: None
    parallel.close()
    if not parallel.main:  # process 0 holds (or has gathered) the whole model and writes it
        return

    if settings.get("lora"):
        model = model.merge_and_unload()  # downstream stages load an ordinary model
    if settings["save_dtype"] != "fp32":  # rounds every weight (training.save_dtype; docs/sizing.md)
        dtype = SAVE_DTYPES[settings["save_dtype"]]
        if weights is None:
            model = model.to(dtype)
        else:  # fsdp: the gathered full weights are what is saved
            weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    with atomic_dir(a.output) as tmp:
        model.save_pretrained(tmp, state_dict=weights)
        load_tokenizer(a.model).save_pretrained(tmp)
        if (Path(a.model) / PROVENANCE).exists():  # carries the base model's origin (and remote-code setting)
            shutil.copy(Path(a.model) / PROVENANCE, tmp / PROVENANCE)
        write_json(tmp / "training_config.json", {"method": method, "training": settings, "seed": a.seed,
                                                  "pairs": a.pairs, "base_model": a.model})
    write_tsv(a.log, pd.DataFrame(log, columns=LOG_COLUMNS))
    checkpointer.remove()


if __name__ == "__main__":
    main()
    exit_past_interpreter_shutdown()  # last: see its docstring
