"""Train a linear unsafe-vs-safe probe on a frozen model's hidden states; save its direction.

    python -m workflow.train_probe --model results/models/base --data results/probe/data.jsonl \
        --benchmark harmbench=results/data/benchmarks/harmbench/all.jsonl \
        --layer -1 --test-fraction 0.25 --seed 0 \
        --direction results/probe/direction.safetensors --metrics results/probe/metrics.json

Features are hidden states at ``--layer`` (``-1`` = last, as returned by transformers, i.e. after
the final norm), mean-pooled over the text's tokens. The probe is a logistic regression; its
weight vector is the direction w_unsafe − w_safe of a two-class softmax probe.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from safetensors.torch import save_file
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from workflow.config import schema_default
from workflow.files import atomic_path, read_jsonl, write_json
from workflow.models import load_model, load_tokenizer
from workflow.probe_data import UNSAFE, assert_disjoint
from workflow.progress import progress


@torch.no_grad()
def mean_hidden_states(model, tokenizer, texts: list[str], layer: int, batch_size: int = 16,
                       max_length: int = 128) -> np.ndarray:
    """[N, hidden] hidden states at ``layer``, averaged over each text's non-padding tokens."""
    out = []
    starts = range(0, len(texts), batch_size)
    for i in progress(starts, total=len(starts), desc="probe features", unit="batch"):
        enc = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, truncation=True,
                        max_length=max_length)
        hidden = model(**enc, output_hidden_states=True).hidden_states[layer]
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(((hidden * mask).sum(1) / mask.sum(1)).float().numpy())
    return np.concatenate(out)


def fit_probe(features: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int):
    """(direction w_unsafe − w_safe [hidden], metrics) of a logistic-regression probe."""
    x_train, x_test, y_train, y_test = train_test_split(
        features, labels, test_size=test_fraction, random_state=seed, stratify=labels)
    clf = LogisticRegression(max_iter=5000).fit(x_train, y_train)
    sign = 1.0 if clf.classes_[1] == UNSAFE else -1.0
    metrics = {"train_accuracy": float(clf.score(x_train, y_train)),
               "heldout_accuracy": float(clf.score(x_test, y_test)),
               "n_train": int(len(y_train)), "n_heldout": int(len(y_test))}
    return sign * clf.coef_[0].astype(np.float32), metrics


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--benchmark", action="append", default=[], metavar="NAME=FILE",
                   help="evaluation prompts the probe data must not contain (checked again here)")
    p.add_argument("--layer", type=int, default=schema_default("probe/layer"))
    p.add_argument("--test-fraction", type=float, default=schema_default("probe/test_fraction"))
    p.add_argument("--seed", type=int, default=schema_default("probe/seed"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--direction", required=True)
    p.add_argument("--metrics", required=True)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    rows = read_jsonl(a.data)
    texts = [r["text"] for r in rows]
    excluded = {}
    for item in a.benchmark:
        name, _, path = item.partition("=")
        excluded[name] = [r["prompt"] for r in read_jsonl(path)]
    assert_disjoint(texts, excluded, f"probe data {a.data}")

    model = load_model(a.model).eval()
    n_layers = model.config.num_hidden_layers
    if not -(n_layers + 1) <= a.layer <= n_layers:
        raise ValueError(f"probe.layer: {a.layer} is outside the model's hidden states (-{n_layers + 1}..{n_layers})")
    features = mean_hidden_states(model, load_tokenizer(a.model), texts, a.layer, a.batch_size)
    direction, metrics = fit_probe(features, np.array([r["label"] for r in rows]), a.test_fraction, a.seed)
    metrics.update({"layer": a.layer, "hidden_size": int(direction.shape[0])})
    with atomic_path(a.direction) as tmp:
        save_file({"direction": torch.from_numpy(direction)}, str(tmp), metadata={"layer": str(a.layer)})
    write_json(a.metrics, metrics)
    print(json.dumps(metrics))


if __name__ == "__main__":
    main()
