"""Select the MLP neurons whose output vectors align with the probe direction.

    python -m workflow.select_subspace --model results/models/base --direction results/probe/direction.safetensors \
        --percent 1 --rank negative --neurons results/subspace/neurons.safetensors --summary results/subspace/summary.tsv

Each neuron's output vector (a column of Llama's ``down_proj``, of GPT-NeoX's ``dense_4h_to_h``,
a row of GPT-2's ``c_proj``) is scored by cosine similarity with the probe direction; the top
``percent`` of all neurons (floor, at least one, as get_sentive_n.py:166-168), ranked across
layers, are kept. ``--rank negative`` keeps the most negative cosines (as the reference code does),
``positive`` the most positive, ``absolute`` the largest magnitudes.

When the direction file also holds the ``secondary`` fit's direction (workflow.train_probe), its
selection is made the same way and compared: the summary gets per-layer ``secondary_selected`` and
``shared`` counts, and the Jaccard overlap of the two neuron sets is printed and stored in the
neurons file's metadata. Only the primary (configured) fit's neurons are saved.
"""
from __future__ import annotations

import argparse
import json
import math

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from workflow.lib.config import schema_default
from workflow.lib.files import atomic_path, write_tsv
from workflow.lib.models import load_model, mlp_output_projections, split_by_layer

RANKINGS = ("negative", "positive", "absolute")


def cosine_scores(vectors: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """[N] cosine similarity of each row of ``vectors`` [N, H] with ``direction`` [H]."""
    return torch.nn.functional.cosine_similarity(vectors.float(), direction.float().unsqueeze(0), dim=1)


def select_top_percent(scores: list[torch.Tensor], percent: float, rank: str) -> list[torch.Tensor]:
    """Per-layer sorted indices of the top ``percent`` % of all neurons under ``rank``.

    ``floor(percent/100 · N)`` neurons, at least one (the official ``int()``); ties are broken by
    (layer, index) order.
    """
    if not 0 < percent <= 100:
        raise ValueError(f"subspace.percent must be in (0, 100], got {percent}")
    if rank not in RANKINGS:
        raise ValueError(f"subspace.rank must be one of {RANKINGS}, got {rank!r}")
    flat = torch.cat(scores)
    key = {"negative": -flat, "positive": flat, "absolute": flat.abs()}[rank]
    k = max(1, math.floor(percent / 100 * flat.numel()))
    return split_by_layer(torch.argsort(key, descending=True, stable=True)[:k], [s.numel() for s in scores])


def jaccard(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """|A ∩ B| / |A ∪ B| of two per-layer neuron selections (a neuron is its (layer, index))."""
    shared = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(a, b, strict=True))
    union = sum(len(x) for x in a) + sum(len(y) for y in b) - shared
    return shared / union if union else 1.0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--direction", required=True)
    p.add_argument("--percent", type=float, default=schema_default("subspace/percent"))
    p.add_argument("--rank", choices=RANKINGS, default=schema_default("subspace/rank"))
    p.add_argument("--neurons", required=True)
    p.add_argument("--summary", required=True)
    a = p.parse_args(argv)

    probe = load_file(a.direction)
    direction = probe["direction"]
    layers = mlp_output_projections(load_model(a.model))
    if layers[0].output_vectors().shape[1] != direction.numel():
        raise ValueError(f"{a.direction}: direction has {direction.numel()} dimensions, "
                         f"the model's MLP outputs have {layers[0].output_vectors().shape[1]}")
    scores = [cosine_scores(l.output_vectors(), direction) for l in layers]
    chosen = select_top_percent(scores, a.percent, a.rank)
    summary = pd.DataFrame({"layer": [l.layer for l in layers], "module": [l.name for l in layers],
                            "selected": [len(c) for c in chosen], "neurons": [l.n_neurons for l in layers]})
    metadata = {"names": json.dumps([l.name for l in layers]), "axes": json.dumps([l.axis for l in layers]),
                "percent": str(a.percent), "rank": a.rank}
    printed = {"selected": int(summary.selected.sum()), "of": int(summary.neurons.sum())}
    if "secondary" in probe:  # the other probe fit: how much the subspace depends on the fit
        other = select_top_percent([cosine_scores(l.output_vectors(), probe["secondary"]) for l in layers],
                                   a.percent, a.rank)
        summary["secondary_selected"] = [len(c) for c in other]
        summary["shared"] = [len(set(x.tolist()) & set(y.tolist())) for x, y in zip(chosen, other)]
        overlap = jaccard(chosen, other)
        printed["jaccard_with_secondary"], metadata["jaccard_with_secondary"] = overlap, str(overlap)
    tensors = {f"layer{l.layer}.index": idx.contiguous() for l, idx in zip(layers, chosen)}
    tensors.update({f"layer{l.layer}.cosine": s.contiguous() for l, s in zip(layers, scores)})
    with atomic_path(a.neurons) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    write_tsv(a.summary, summary)
    print(json.dumps(printed))

if __name__ == "__main__":
    main()
