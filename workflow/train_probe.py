"""Train a linear unsafe-vs-safe probe on a frozen model's hidden states; save its direction.

    python -m workflow.train_probe --model results/models/base --data results/probe/data.jsonl \
        --benchmark harmbench=results/data/benchmarks/harmbench/all.jsonl \
        --spec-json '{"fit": "linear_head", "max_tokens": 256, "length_rule": "drop"}' \
        --direction results/probe/direction.safetensors --metrics results/probe/metrics.json

``--spec-json`` is the config's ``probe`` entry (its ``data`` is not read here); absent keys take the
schema's defaults. Features are hidden states at ``layer`` (``-1`` = last, as returned by
transformers, i.e. after the final norm), mean-pooled over the text's tokens, in fp32 (on a GPU if
one is visible). Texts of ``max_tokens`` tokens or more are dropped (with every text of their PKU
pair) or cut, by ``length_rule``. Both fits are computed on the same train/held-out split:

- ``logistic``: an L2 logistic regression (C=1, lbfgs to convergence);
- ``linear_head``: the official probe, ``nn.Linear(hidden, 2)`` with log-softmax NLL and Adam,
  the head kept being the best held-out one within the last epoch.

Both directions are w_unsafe − w_safe. The configured ``fit`` is saved as ``direction``, the
other as ``secondary``; the metrics give both accuracies and the cosine of the two directions
(workflow.select_subspace adds the overlap of the neurons they select). See docs/probe.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import math

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from workflow.lib.config import ConfigError, fill_defaults
from workflow.lib.decontamination import SAFE, UNSAFE, assert_disjoint
from workflow.lib.files import atomic_path, read_jsonl, write_json
from workflow.lib.models import load_model, load_tokenizer, placement
from workflow.lib.progress import progress

FITS = ("logistic", "linear_head")


def token_lengths(tokenizer, texts: list[str]) -> np.ndarray:
    """[N] tokens of each text as the model sees it (special tokens included, e.g. Llama-3's BOS;
    the official count is ``tokenizer.encode(text)``, train_probe_pku_30k.py:473)."""
    return np.array([len(ids) for ids in tokenizer(texts)["input_ids"]], dtype=np.int64)


def length_filter(lengths: np.ndarray, max_tokens: int, pairs: list | None = None) -> np.ndarray:
    """[N] bool: texts kept by the drop rule. A text of ``max_tokens`` tokens or more is dropped,
    and with ``pairs`` (each text's pair id, or None) so is every text sharing its pair."""
    too_long = lengths >= max_tokens
    if pairs is None:
        return ~too_long
    bad = {p for p, long in zip(pairs, too_long) if long and p is not None}
    return np.array([not long and (p is None or p not in bad) for p, long in zip(pairs, too_long)])


@torch.no_grad()
def mean_hidden_states(model, tokenizer, texts: list[str], layer: int, max_tokens: int, batch_size: int = 16,
                       device: str = "cpu") -> np.ndarray:
    """[N, hidden] fp32 hidden states at ``layer``, averaged over each text's tokens (cut at ``max_tokens``).

    Texts are batched in order of length so that little padding is computed; the mean runs over the
    attention mask only, so a text's features do not depend on its batch.
    """
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    starts = range(0, len(texts), batch_size)
    for i in progress(starts, total=len(starts), desc="probe features", unit="batch"):
        idx = order[i:i + batch_size]
        enc = tokenizer([texts[j] for j in idx], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_tokens).to(device)
        hidden = model(**enc, output_hidden_states=True).hidden_states[layer].float()
        mask = enc["attention_mask"].unsqueeze(-1).float()
        out[idx] = ((hidden * mask).sum(1) / mask.sum(1)).cpu().numpy()
    return out


def split_heldout(labels: np.ndarray, test_fraction: float, n_heldout: int, seed: int):
    """(train indices, held-out indices), stratified by label; ``n_heldout`` texts when > 0, else a
    ``test_fraction`` share."""
    counts = np.bincount(labels, minlength=2)
    if counts.min() < 2:
        raise ConfigError(f"probe texts: {counts[UNSAFE]} unsafe and {counts[SAFE]} safe after the length rule;"
                          " each class needs 2 or more (config keys probe.max_tokens, probe.length_rule, probe.data)")
    if n_heldout == 1 or n_heldout > len(labels) - 2:
        raise ConfigError(f"config key probe.n_heldout: {n_heldout} held-out texts of {len(labels)} probe texts;"
                          " a stratified split needs 2 or more on each side")
    size = n_heldout if n_heldout > 0 else test_fraction
    return train_test_split(np.arange(len(labels)), test_size=size, random_state=seed, stratify=labels)


def fit_logistic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, dict]:
    """(direction w_unsafe − w_safe, bias, info) of an L2 logistic regression (C=1, lbfgs)."""
    clf = LogisticRegression(max_iter=5000).fit(x, y)
    sign = 1.0 if clf.classes_[1] == UNSAFE else -1.0
    return (sign * clf.coef_[0]).astype(np.float32), float(sign * clf.intercept_[0]), {"iterations": int(clf.n_iter_[0])}


def fit_linear_head(x: np.ndarray, y: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, settings: dict,
                    seed: int) -> tuple[np.ndarray, float, dict]:
    """(direction w[UNSAFE] − w[SAFE], bias, info) of the official probe head.

    ``nn.Linear(hidden, 2)`` with its default init, log-softmax NLL, Adam (default betas, no weight decay),
    ``batch_size`` texts per step in a fresh seeded order each epoch (the last batch may be smaller). After
    step 0, valid_every, 2·valid_every, ... of each epoch the held-out mean NLL is measured, and the lowest of
    an epoch is remembered; ``checkpoint: best_in_last_epoch`` keeps the last epoch's best (the official
    ``toxicity_classifier_head_epoch_10.pt``), ``last`` the final weights (train_probe_pku_30k.py:233-288).
    Features are fixed (frozen encoder in eval mode), so training on them equals the official uncached loop.
    """
    x_t, y_t = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    xv_t, yv_t = torch.from_numpy(x_val).float(), torch.from_numpy(y_val).long()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = torch.nn.Linear(x.shape[1], 2)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(head.parameters(), lr=settings["lr"])
    init = (head.weight[UNSAFE] - head.weight[SAFE]).detach().clone()
    batch, every = settings["batch_size"], settings["valid_every"]
    steps = math.ceil(len(y) / batch)
    best_loss, best_state, best_step = math.inf, None, None
    for epoch in progress(range(settings["epochs"]), total=settings["epochs"], desc="linear head", unit="epoch"):
        order = torch.randperm(len(y), generator=generator)
        best_loss, best_state = math.inf, None  # the official best_so_far is reset every epoch
        for b in range(steps):
            idx = order[b * batch:(b + 1) * batch]
            loss = torch.nn.functional.cross_entropy(head(x_t[idx]), y_t[idx])  # = nll_loss(log_softmax)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if b % every == 0:
                with torch.no_grad():
                    val = torch.nn.functional.cross_entropy(head(xv_t), yv_t).item()
                if val < best_loss:
                    best_loss, best_state, best_step = val, copy.deepcopy(head.state_dict()), epoch * steps + b
    if settings["checkpoint"] == "best_in_last_epoch":
        head.load_state_dict(best_state)
    else:
        best_step = settings["epochs"] * steps - 1
    w, bias = head.weight.detach(), head.bias.detach()
    direction = w[UNSAFE] - w[SAFE]
    info = {"steps": settings["epochs"] * steps, "kept_step": int(best_step),
            # the official direction keeps the head's random init (Adam moves w[0] and w[1] by opposite amounts,
            # so w[0] + w[1] never changes): its share of the squared norm, and the cosine with it
            "init_share": float(init.square().sum() / direction.square().sum()),
            "cosine_with_init": cosine(direction.numpy(), init.numpy())}
    return direction.numpy().astype(np.float32), float(bias[UNSAFE] - bias[SAFE]), info


def accuracy(x: np.ndarray, y: np.ndarray, direction: np.ndarray, bias: float) -> float:
    """Share of texts on the right side of the probe's boundary (unsafe when x·direction + bias > 0)."""
    return float(np.mean((x @ direction + bias > 0) == (y == UNSAFE)))


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def fit_both(features: np.ndarray, labels: np.ndarray, spec: dict):
    """{fit: direction} and metrics of both fits on one seeded train/held-out split."""
    train, held = split_heldout(labels, spec["test_fraction"], spec["n_heldout"], spec["seed"])
    x, y, xv, yv = features[train], labels[train], features[held], labels[held]
    fitted = {"logistic": fit_logistic(x, y),
              "linear_head": fit_linear_head(x, y, xv, yv, spec["linear_head"], spec["seed"])}
    directions = {name: d for name, (d, _, _) in fitted.items()}
    fits = {name: {"train_accuracy": accuracy(x, y, d, b), "heldout_accuracy": accuracy(xv, yv, d, b), **info}
            for name, (d, b, info) in fitted.items()}
    primary = spec["fit"]
    secondary = next(f for f in FITS if f != primary)
    metrics = {"fit": primary, "secondary_fit": secondary,
               "train_accuracy": fits[primary]["train_accuracy"], "heldout_accuracy": fits[primary]["heldout_accuracy"],
               "n_train": int(len(train)), "n_heldout": int(len(held)),
               "fit_cosine": cosine(directions[primary], directions[secondary]), "fits": fits}
    return directions, metrics


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--benchmark", action="append", default=[], metavar="NAME=FILE",
                   help="evaluation prompts the probe data must not contain (checked again here)")
    p.add_argument("--spec-json", default="{}", help="the config's probe entry as JSON (defaults from the schema)")
    p.add_argument("--batch-size", type=int, default=16, help="texts per forward pass (speed only)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--direction", required=True)
    p.add_argument("--metrics", required=True)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    spec = fill_defaults(json.loads(a.spec_json), "probe")

    rows = read_jsonl(a.data)
    texts = [r["text"] for r in rows]
    excluded = {}
    for item in a.benchmark:
        name, _, path = item.partition("=")
        excluded[name] = [r["prompt"] for r in read_jsonl(path)]
    # a PKU text is its prompt inside a template: the prompt it was built from is checked too
    assert_disjoint(texts + [r["prompt"] for r in rows if r.get("prompt")], excluded, f"probe data {a.data}")

    device, dtype = placement("fp32")  # the official probe runs its encoder in fp32 (train_probe_pku_30k.py:74)
    model = load_model(a.model, dtype=dtype, device=device).eval()
    tokenizer = load_tokenizer(a.model)
    n_layers = model.config.num_hidden_layers
    if not -(n_layers + 1) <= spec["layer"] <= n_layers:
        raise ConfigError(f"config key probe.layer: {spec['layer']} is outside the model's hidden states"
                          f" (-{n_layers + 1}..{n_layers})")
    lengths = token_lengths(tokenizer, texts)
    max_tokens = spec["max_tokens"]
    if spec["length_rule"] == "drop":
        keep = length_filter(lengths, max_tokens, [r.get("pair") for r in rows])
    else:
        keep = np.ones(len(rows), dtype=bool)
    labels = np.array([r["label"] for r in rows])[keep]
    texts = [t for t, k in zip(texts, keep) if k]
    text_counts = {"read": len(rows), "kept": len(texts), "dropped": int((~keep).sum()),
                   "too_long": int((lengths >= max_tokens).sum()),
                   "truncated": int((lengths > max_tokens).sum()) if spec["length_rule"] == "truncate" else 0,
                   "unsafe": int((labels == UNSAFE).sum()), "safe": int((labels == SAFE).sum()),
                   "longest_kept": int(np.minimum(lengths, max_tokens)[keep].max()) if keep.any() else 0}
    print(json.dumps({"probe_texts": text_counts}), flush=True)

    features = mean_hidden_states(model, tokenizer, texts, spec["layer"], max_tokens, a.batch_size, device)
    directions, metrics = fit_both(features, labels, spec)
    metrics.update({"model": spec["model"], "layer": spec["layer"], "hidden_size": int(features.shape[1]),
                    "max_tokens": max_tokens, "length_rule": spec["length_rule"], "texts": text_counts})
    tensors = {"direction": torch.from_numpy(directions[metrics["fit"]]),
               "secondary": torch.from_numpy(directions[metrics["secondary_fit"]])}
    with atomic_path(a.direction) as tmp:
        save_file(tensors, str(tmp), metadata={"layer": str(spec["layer"]), "fit": metrics["fit"],
                                               "secondary_fit": metrics["secondary_fit"]})
    write_json(a.metrics, metrics)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
