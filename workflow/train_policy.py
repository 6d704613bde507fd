"""Preference-train a policy with DPO, token-level or reward-level ShaPO on a (noisy) preference set.

    python -m workflow.train_policy --model results/models/base --pairs results/data/noisy/noise0.4/seed0.jsonl \
        --reference results/data/preferences/reference_logps.jsonl --subspace results/subspace/neurons.safetensors \
        --method-json '{"loss": "dpo", "beta": 0.1, "sharpness": {"interval": 5, "gamma_min": 2e-6, "gamma_max": 4e-6}}' \
        --training-json '{"batch_size": 4, "epochs": 1, "lr": 5e-6, ...}' --seed 0 \
        --output results/policies/shapo/noise0.4/seed0 --log results/policies/shapo/noise0.4/seed0.tsv

Every ``interval``-th step of a method with ``sharpness`` is sharpness-aware: gradients at θ,
the perturbed weights (``subspace``: probe-selected neurons, random, uniform or all) moved
uphill (``raw`` γ·g with γ ~ U[γ_min, γ_max], or ``normalized`` ρ·g/‖g‖), loss and gradients
again at that point, weights restored exactly, and the optimizer step taken with the second
gradients. A method with ``reward_labels`` is reward-level: each pair's label is the soft label
p = σ(β_r·(r_chosen − r_rejected)) from ``--rewards`` (workflow.reward_model) and the loss the
cross-entropy between p and σ(β·h). Checkpoints every ``checkpoint_every`` steps let a killed job resume.
"""
from __future__ import annotations

import argparse
import json
import math
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
from workflow.losses import LOSSES, PairLogps, pair_losses, reduce_losses, soft_labels
from workflow.models import PROVENANCE, load_model, load_tokenizer, mlp_output_projections
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


def preference_loss(model, batch: dict, records: list[dict], method: dict):
    """(batch loss, h [B]) for one batch under the method's loss and reduction."""
    logps, counts, n = sequence_logps(model, batch), answer_token_counts(batch), len(records)
    labels = torch.tensor([r["soft_label"] for r in records]) if "reward_labels" in method else None
    pair = PairLogps(logps[:n], logps[n:], torch.tensor([r["ref_chosen"] for r in records]),
                     torch.tensor([r["ref_rejected"] for r in records]), counts[:n], counts[n:], labels)
    loss = reduce_losses(pair_losses(method, pair), method.get("dr_beta"))
    return loss, pair.h.detach()


def gradients_at_perturbed_point(model, batch, records, method, selected, gamma: float, step: int) -> float:
    """ShaPO's second pass: move the selected weights by γ·∇ (using the gradients already in
    ``.grad``), recompute loss and gradients there, restore the weights exactly. Leaves the
    perturbed-point gradients in ``.grad``; returns the perturbed-point loss."""
    saved = perturb_selected(selected, gamma)
    for p in model.parameters():
        p.grad = None
    loss, _ = preference_loss(model, batch, records, method)
    check_finite(loss, step, records, "perturbed")
    loss.backward()
    restore_selected(selected, saved)
    return loss.item()


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


def train(model, tokenizer, records, method, settings, seed, selected=None, checkpointer: Checkpointer | None = None):
    """Run the training loop; returns the per-step log as a list of dicts.

    With a ``checkpointer`` the loop saves every few steps and first resumes from a matching
    checkpoint, restoring weights, optimizer, schedule, batch order and every RNG, so a resumed
    run ends with the same weights as an uninterrupted one.
    """
    rng = np.random.default_rng(seed)
    gamma_rng = random.Random(seed)
    sharp = method.get("sharpness")
    if sharp and not selected:
        raise ValueError("sharpness-aware training needs a non-empty subspace")
    encoded = [encode_response_pair(tokenizer, r, settings["max_length"], settings["max_prompt_length"],
                                    settings.get("prompt_format", "auto")) for r in records]
    bs = settings["batch_size"]
    steps_per_epoch = math.ceil(len(records) / bs)
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
        for start in range((step - epoch * steps_per_epoch) * bs, len(order), bs):
            step += 1
            t0 = time.perf_counter()
            idx = order[start:start + bs]
            recs = [records[i] for i in idx]
            batch = collate_pairs([encoded[i] for i in idx], tokenizer.pad_token_id)
            sharp_step = bool(sharp) and step % sharp["interval"] == 0
            # with LoRA the perturbed base weights are frozen: they need gradients on sharpness-aware
            # steps only, and never reach the optimizer (built from the trainable parameters)
            frozen = list({id(s.weight): s.weight for s in selected if not s.weight.requires_grad}.values()) \
                if sharp_step else []
            for w in frozen:
                w.requires_grad_(True)
            loss, h = preference_loss(model, batch, recs, method)
            check_finite(loss, step, recs, "training")
            loss.backward()
            row = {"step": step, "epoch": epoch, "loss": loss.item(), "loss_perturbed": float("nan"),
                   "sharpness_step": False, "gamma": 0.0}
            if sharp_step:
                gamma = step_size(sharp, selected, gamma_rng)
                loss2 = gradients_at_perturbed_point(model, batch, recs, method, selected, gamma, step)
                row.update(loss_perturbed=loss2, sharpness_step=True, gamma=gamma)
            for w in frozen:
                w.requires_grad_(False)
                w.grad = None
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), settings.get("max_grad_norm", 1.0))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            flipped = torch.tensor([bool(r.get("flipped", False)) for r in recs])
            correct = (h > 0).float()
            row.update({
                "margin": (method["beta"] * h).mean().item(),
                "acc_clean": correct[~flipped].mean().item() if (~flipped).any() else float("nan"),
                "acc_flipped": correct[flipped].mean().item() if flipped.any() else float("nan"),
                "n_clean": int((~flipped).sum()), "n_flipped": int(flipped.sum()),
                "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                "seconds": time.perf_counter() - t0,
            })
            log.append(row)
            print(json.dumps({k: row[k] for k in ("step", "loss", "margin", "sharpness_step", "seconds")}), flush=True)
            if checkpointer and checkpointer.due(step, total):
                checkpointer.save(model, optimizer, scheduler,
                                  {"step": step, "epoch": epoch, "order": order.tolist(), "log": log}, (rng, gamma_rng))
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
    p.add_argument("--log", required=True, help="per-step training log (TSV)")
    p.add_argument("--checkpoint", help="checkpoint folder (default: <output>.checkpoint); removed after success")
    a = p.parse_args(argv)
    method, settings = json.loads(a.method_json), json.loads(a.training_json)
    if method["loss"] not in LOSSES:
        raise ValueError(f"method loss {method['loss']!r} is unknown; expected one of {LOSSES}")
    if a.threads:
        torch.set_num_threads(a.threads)
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
    log = train(model, load_tokenizer(a.model), records, method, settings, a.seed, selected, checkpointer)

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
