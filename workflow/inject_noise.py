"""Flip a fraction of preference pairs (chosen <-> rejected), seeded, keeping a ``flipped`` flag.

    python -m workflow.inject_noise --input results/data/preferences/train.jsonl --rate 0.4 --seed 0 \
        --output results/data/noisy/noise0.4/seed0.jsonl --summary results/data/noisy/noise0.4/seed0.json
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from workflow.lib.files import read_jsonl, write_json, write_jsonl


def flip_pairs(records: list[dict], rate: float, seed: int) -> list[dict]:
    """Copy of ``records`` with exactly ``round(rate * N)`` pairs swapped.

    The flipped pairs are the first ``round(rate * N)`` of a permutation drawn from ``seed``, so
    a higher rate with the same seed flips a superset of the pairs a lower rate flips.
    """
    if not 0.0 <= rate < 0.5:
        raise ValueError(f"noise rate must be in [0, 0.5), got {rate}")
    n_flip = int(round(rate * len(records)))
    flip = set(np.random.default_rng(seed).permutation(len(records))[:n_flip].tolist())
    out = []
    for i, r in enumerate(records):
        r = dict(r)
        if i in flip:
            r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
        r["flipped"] = i in flip
        out.append(r)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", required=True)
    p.add_argument("--rate", type=float, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--summary", required=True)
    a = p.parse_args(argv)

    noisy = flip_pairs(read_jsonl(a.input), a.rate, a.seed)
    n_flipped = sum(r["flipped"] for r in noisy)
    write_jsonl(a.output, noisy)
    summary = {"requested_rate": a.rate, "seed": a.seed, "pairs": len(noisy), "flipped": n_flipped,
               "realised_rate": n_flipped / len(noisy) if noisy else 0.0}
    write_json(a.summary, summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
