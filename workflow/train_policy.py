"""Preference-train a policy with DPO, token-level or reward-level ShaPO on a (noisy) preference set.

    python -m workflow.train_policy --model results/models/base --pairs results/data/noisy/noise0.4/seed0.jsonl \
        --reference results/data/preferences/reference_logps.jsonl --subspace results/subspace/neurons.safetensors \
        --method-json '{"loss": "dpo", "beta": 0.1, "sharpness": {"interval": 5, "gamma_min": 2e-6, "gamma_max": 4e-6}}' \
        --training-json '{"batch_size": 4, "epochs": 1, "lr": 5e-6, ...}' --seed 0 \
        --output results/policies/shapo/noise0.4/seed0 --train-log results/policies/shapo/noise0.4/seed0.tsv

Every ``interval``-th step of a method with ``sharpness`` is sharpness-aware: gradients at θ,
the perturbed weights (``subspace``: probe-selected neurons, random, uniform or all) moved
uphill (``raw`` γ·g with γ ~ U[γ_min, γ_max], or ``normalized`` ρ·g/‖g‖), loss and gradients
again at that point, weights restored exactly, and the optimizer step taken with the second
gradients. A method with ``reward_labels`` is reward-level: each pair's label is the soft label
p = σ(β_r·(r_chosen − r_rejected)) from ``--rewards`` (workflow.reward_model) and the loss the
cross-entropy between p and σ(β·h). Checkpoints every ``checkpoint_every`` steps let a killed job resume.

Runs on a GPU when one is visible (``precision: auto`` = bf16 autocast there, fp32 on CPU). Under
``torchrun --nproc_per_node N`` (the rule does this for ``training.devices: N``) it trains data-parallel
through accelerate (DDP; gloo on CPU, NCCL on GPUs): each global batch is split over the processes,
gradients are averaged before the perturbation, so every process moves the same selected columns by
the same amount, and the result equals a one-process run on the whole batch (Dr.DPO included, see
``losses.data_parallel_reduction``). Only process 0 writes checkpoints and outputs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, safe_open

from workflow.checkpoint import Checkpointer, file_digest, fingerprint
from workflow.files import atomic_dir, read_jsonl, write_json, write_tsv
from workflow.losses import LOSSES, PairLogps, data_parallel_reduction, pair_losses, reduce_losses, soft_labels
from workflow.models import PROVENANCE, load_model, load_tokenizer, mlp_output_projections, placement
from workflow.pairs import answer_token_counts, collate_pairs, encode_response_pair, sequence_logps, text_key
from workflow.select_subspace import split_by_layer
from workflow.sharpness import SelectedNeurons, perturb_selected, restore_selected, step_size


class NonFiniteLoss(FloatingPointError):
    pass


LOG_COLUMNS = ["step", "epoch", "loss", "loss_perturbed", "sharpness_step", "gamma", "margin", "acc_clean",
               "acc_flipped", "n_clean", "n_flipped", "grad_norm", "lr", "seconds"]


def perturbed_set(model, sharpness: dict, subspace_path: str | None, seed: int) -> list[SelectedNeurons]:
    """What a sharpness-aware step moves, by ``sharpness.subspace``:

    ``probe`` the probe-selected neurons (the method); ``random`` as many neurons drawn at
    random from all MLP output neurons (seeded); ``uniform`` every MLP output neuron; ``full``
    every parameter (plain SAM).
    """
    kind = sharpness.get("subspace", "probe")
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


def gradients_at_perturbed_point(model, batch, records, method, selected, gamma: float, step: int,
                                 parallel: DataParallel, all_records: list[dict], frozen=()) -> float:
    """ShaPO's second pass: move the selected weights by γ·∇ (using the gradients already in
    ``.grad``), recompute loss and gradients there, restore the weights exactly. Leaves the
    perturbed-point gradients in ``.grad``; returns the perturbed-point loss. ``records`` are this
    process's pairs, ``all_records`` the global batch's (named when the loss is not finite)."""
    saved = perturb_selected(selected, gamma)
    for p in model.parameters():
        p.grad = None
    loss, value, _ = preference_loss(model, batch, records, method, parallel)
    check_finite(value, step, all_records, "perturbed")
    loss.backward()
    parallel.average_gradients(frozen)
    restore_selected(selected, saved)
    return value.item()


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


def check_finite(loss: torch.Tensor, step: int, records: list[dict], where: str) -> None:
    if not torch.isfinite(loss):
        ids = ", ".join(r["pair_id"] for r in records)
        raise NonFiniteLoss(f"non-finite {where} loss ({loss.item()}) at step {step}, pairs: {ids}")


def make_optimizer(model, settings: dict, total_steps: int):
    from transformers import get_scheduler

    kind = settings.get("optimizer", "adamw")
    params = [p for p in model.parameters() if p.requires_grad]
    if kind == "adamw":
        opt = torch.optim.AdamW(params, lr=settings["lr"], weight_decay=settings.get("weight_decay", 0.0),
                                fused=all(p.device.type in ("cpu", "cuda") for p in params))
    elif kind == "rmsprop":
        opt = torch.optim.RMSprop(params, lr=settings["lr"])
    else:
        raise ValueError(f"training.optimizer: unknown optimizer {kind!r}; expected adamw or rmsprop")
    warmup = int(math.ceil(settings.get("warmup_ratio", 0.0) * total_steps))
    return opt, get_scheduler(settings.get("schedule", "linear"), opt, warmup, total_steps)


def pairs_used(n_records: int, batch_size: int, world: int) -> int:
    """Pairs trained on per epoch: all, unless a last partial batch has fewer pairs than processes
    (each process needs at least one), which is then left out of the epoch, with a note in the log."""
    if batch_size < world:
        raise ValueError(f"training.batch_size ({batch_size}) is the global batch and must be at least "
                         f"training.devices ({world}): every process needs pairs")
    rest = n_records % batch_size
    return n_records - rest if 0 < rest < world else n_records


def train(model, tokenizer, records, method, settings, seed, selected=None, checkpointer: Checkpointer | None = None,
          parallel: DataParallel | None = None):
    """Run the training loop; returns the per-step log as a list of dicts.

    With a ``checkpointer`` the loop saves every few steps and first resumes from a matching
    checkpoint, restoring weights, optimizer, schedule, batch order and every RNG, so a resumed
    run ends with the same weights as an uninterrupted one. ``parallel`` places the model and
    splits each batch over data-parallel processes (default: this process alone).
    """
    parallel = parallel or DataParallel(settings.get("precision", "auto"))
    used = pairs_used(len(records), settings["batch_size"], parallel.world)
    if used < len(records) and parallel.main:
        print(json.dumps({"left_out_per_epoch": len(records) - used, "reason": "last batch smaller than devices"}),
              flush=True)
    model.to(parallel.device)
    # DDP (several processes) comes from accelerate; the unwrapped ``model`` keeps
    # the same Parameter objects, so ``selected`` and checkpoints refer to it
    forward = parallel.accelerator.prepare_model(model)
    rng = np.random.default_rng(seed)
    gamma_rng = random.Random(seed)
    sharp = method.get("sharpness")
    if sharp and not selected:
        raise ValueError("sharpness-aware training needs a non-empty subspace")
    encoded = [encode_response_pair(tokenizer, r, settings["max_length"], settings["max_prompt_length"],
                                    settings.get("prompt_format", "auto")) for r in records]
    bs = settings["batch_size"]
    steps_per_epoch = math.ceil(used / bs)
    total = steps_per_epoch * settings["epochs"]
    optimizer, scheduler = make_optimizer(model, settings, total)
    log, step, first_epoch, order = [], 0, 0, None
    resumed = checkpointer.load(model, optimizer, scheduler, (rng, gamma_rng)) if checkpointer else None
    if resumed:
        log, step, first_epoch, order = resumed["log"], resumed["step"], resumed["epoch"], np.array(resumed["order"])
        print(json.dumps({"resumed_at_step": step, "of": total}), flush=True)
    model.train()
    for epoch in range(first_epoch, settings["epochs"]):
        if order is None:
            order = rng.permutation(len(records))
        for start in range((step - epoch * steps_per_epoch) * bs, used, bs):
            step += 1
            t0 = time.perf_counter()
            idx = order[start:start + bs]
            recs_all = [records[i] for i in idx]
            idx = parallel.share(idx)
            recs = [records[i] for i in idx]
            batch = collate_pairs([encoded[i] for i in idx], tokenizer.pad_token_id)
            sharp_step = bool(sharp) and step % sharp["interval"] == 0
            # with LoRA the perturbed base weights are frozen: they need gradients on sharpness-aware
            # steps only, and never reach the optimizer (built from the trainable parameters)
            frozen = list({id(s.weight): s.weight for s in selected if not s.weight.requires_grad}.values()) \
                if sharp_step else []
            for w in frozen:
                w.requires_grad_(True)
            loss, value, h = preference_loss(forward, batch, recs, method, parallel)
            check_finite(value, step, recs_all, "training")
            loss.backward()
            parallel.average_gradients(frozen)
            row = {"step": step, "epoch": epoch, "loss": value.item(), "loss_perturbed": float("nan"),
                   "sharpness_step": False, "gamma": 0.0}
            if sharp_step:
                gamma = step_size(sharp, selected, gamma_rng)
                loss2 = gradients_at_perturbed_point(forward, batch, recs, method, selected, gamma, step,
                                                     parallel, recs_all, frozen)
                row.update(loss_perturbed=loss2, sharpness_step=True, gamma=gamma)
            for w in frozen:
                w.requires_grad_(False)
                w.grad = None
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.get("max_grad_norm", 1.0))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            flipped = torch.tensor([bool(r.get("flipped", False)) for r in recs], device=h.device)
            correct = (h > 0).float()
            # margin and accuracies over the whole global batch: sums over every process's pairs
            margin, right_clean, n_clean, right_flipped, n_flipped = parallel.all_sum(torch.stack([
                (method["beta"] * h).sum(), correct[~flipped].sum(), (~flipped).sum().float(),
                correct[flipped].sum(), flipped.sum().float()])).tolist()
            row.update({
                "margin": margin / len(recs_all),
                "acc_clean": right_clean / n_clean if n_clean else float("nan"),
                "acc_flipped": right_flipped / n_flipped if n_flipped else float("nan"),
                "n_clean": int(n_clean), "n_flipped": int(n_flipped),
                "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                "seconds": time.perf_counter() - t0,
            })
            log.append(row)
            if parallel.main:
                print(json.dumps({k: row[k] for k in ("step", "loss", "margin", "sharpness_step", "seconds")}),
                      flush=True)
            if checkpointer and checkpointer.due(step, total):
                if parallel.main:
                    checkpointer.save(model, optimizer, scheduler, {"step": step, "epoch": epoch,
                                                                    "order": order.tolist(), "log": log},
                                      (rng, gamma_rng))
                parallel.barrier()
        order = None
    return log


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="base model folder (also the reference model)")
    p.add_argument("--pairs", required=True)
    p.add_argument("--reference", required=True, help="reference log-probs from workflow.reference_logps")
    p.add_argument("--subspace", help="neurons.safetensors from workflow.select_subspace (ShaPO methods)")
    p.add_argument("--rewards", help="pair_rewards.jsonl from workflow.reward_model (reward-level methods)")
    p.add_argument("--method-json", required=True, help="the method preset as JSON")
    p.add_argument("--training-json", required=True, help="the config's training section as JSON")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--output", required=True, help="folder for the trained weights (safetensors)")
    # --train-log first: torchrun, which launches data-parallel runs, reads an abbreviated "--log" as its own --log-dir
    p.add_argument("--train-log", "--log", dest="log", required=True, help="per-step training log (TSV)")
    p.add_argument("--checkpoint", help="checkpoint folder (default: <output>.checkpoint); removed after success")
    a = p.parse_args(argv)
    method, settings = json.loads(a.method_json), json.loads(a.training_json)
    if method["loss"] not in LOSSES:
        raise ValueError(f"method loss {method['loss']!r} is unknown; expected one of {LOSSES}")
    if a.threads:  # the job's threads, shared by its data-parallel processes
        torch.set_num_threads(max(1, a.threads // int(os.environ.get("WORLD_SIZE", "1"))))
    torch.manual_seed(a.seed)

    records = read_jsonl(a.pairs)
    attach_reference(records, read_jsonl(a.reference), a.reference)
    if "reward_labels" in method:
        if not a.rewards:
            raise ValueError("a reward-level method (reward_labels) needs the reward model's scores (--rewards)")
        attach_soft_labels(records, read_jsonl(a.rewards), method["reward_labels"]["beta_r"], a.rewards)
        flipped = np.array([bool(r.get("flipped", False)) for r in records])
        p = np.array([r["soft_label"] for r in records])
        print(json.dumps({"soft_label_mean_clean": float(p[~flipped].mean()) if (~flipped).any() else None,
                          "soft_label_mean_flipped": float(p[flipped].mean()) if flipped.any() else None,
                          "flips_corrected": int((p[flipped] < 0.5).sum()), "n_flipped": int(flipped.sum())}),
              flush=True)
    model = load_model(a.model)
    selected = perturbed_set(model, method["sharpness"], a.subspace, a.seed) if method.get("sharpness") else None
    if settings.get("lora"):
        model = apply_lora(model, settings["lora"])
    inputs = [file_digest(f) for f in (a.pairs, a.reference, a.subspace, a.rewards) if f]
    key = fingerprint(method, {k: v for k, v in settings.items() if k != "checkpoint_every"}, a.seed, inputs,
                      str(Path(a.model).resolve()))
    checkpointer = Checkpointer(a.checkpoint or f"{a.output.rstrip('/')}.checkpoint",
                                settings.get("checkpoint_every", 0), key)
    parallel = DataParallel(settings.get("precision", "auto"))
    log = train(model, load_tokenizer(a.model), records, method, settings, a.seed, selected, checkpointer, parallel)
    if parallel.world > 1:
        torch.distributed.destroy_process_group()
        if not parallel.main:  # every process holds the same weights; process 0 writes them
            return

    if settings.get("lora"):
        model = model.merge_and_unload()  # downstream stages load an ordinary model
    with atomic_dir(a.output) as tmp:
        model.save_pretrained(tmp)
        load_tokenizer(a.model).save_pretrained(tmp)
        if (Path(a.model) / PROVENANCE).exists():  # carries the base model's origin (and remote-code setting)
            shutil.copy(Path(a.model) / PROVENANCE, tmp / PROVENANCE)
        write_json(tmp / "training_config.json", {"method": method, "training": settings, "seed": a.seed,
                                                  "pairs": a.pairs, "base_model": a.model})
    write_tsv(a.log, pd.DataFrame(log, columns=LOG_COLUMNS))
    checkpointer.remove()


if __name__ == "__main__":
    main()
