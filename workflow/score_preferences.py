"""Score a model on the clean held-out preference pairs: the implicit reward margin of every pair.

    python -m workflow.score_preferences --pairs results/data/preferences/heldout.jsonl \
        --reference results/data/preferences/heldout_reference_logps.jsonl \
        --model results/policies/dpo/noise0/seed0 --beta 0.1 \
        --training-json '{"max_length": 128, "max_prompt_length": 64, "batch_size": 4}' --prompt-format auto \
        --tags-json '{"method": "dpo", "noise": 0.0, "seed": 0}' \
        --output results/preference_scores/dpo/noise0/seed0.jsonl --summary results/preference_scores/dpo/noise0/seed0.json

Per held-out pair (never trained on, never corrupted by noise) the margin is

    m = β·[(log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)]

with β of the model's method preset and π_ref the start model (the same reference as training); the
pair counts as correct when m > 0, half when m = 0 (an unchanged model is at chance, 0.5), wrong when
m < 0. The reference log-probs come from ``workflow.reference_logps`` run once on the held-out pairs;
this stage needs forward passes of the model only, tokenised exactly as in training. Without
``--model`` the model *is* the reference (the base model when no SFT stage runs): every margin is 0
by definition and no forward pass is made. This is the metric the noise-robust DPO papers (rDPO, cDPO)
report; ``workflow.stats`` pairs it across methods by pair id.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from workflow.lib.files import read_jsonl, write_json, write_jsonl
from workflow.lib.pairs import text_key


def pair_logps(rows: list[dict], records: list[dict], path: str) -> np.ndarray:
    """[pairs, 2] (chosen, rejected) log-probs of ``records`` from scored ``rows`` (reference_logps output),
    looked up by pair id and answer text, so a file of other pairs or other answers fails here."""
    by_id = {r["pair_id"]: r["logps"] for r in rows}
    out = np.empty((len(records), 2))
    for i, r in enumerate(records):
        logps = by_id.get(r["pair_id"])
        if logps is None:
            raise ValueError(f"{path}: no log-probs for held-out pair {r['pair_id']!r}; rerun its scoring rule")
        try:
            out[i] = logps[text_key(r["chosen"])], logps[text_key(r["rejected"])]
        except KeyError:
            raise ValueError(f"{path}: pair {r['pair_id']!r} was scored with other answers; rerun its scoring rule") \
                from None
    return out


def margins(policy: np.ndarray, reference: np.ndarray, beta: float) -> np.ndarray:
    """β·[(log π − log π_ref)(chosen) − (log π − log π_ref)(rejected)] per pair, from [pairs, 2] arrays."""
    ratio = np.asarray(policy, dtype=float) - np.asarray(reference, dtype=float)
    return beta * (ratio[:, 0] - ratio[:, 1])


def correct(margin) -> np.ndarray:
    """Per pair: 1 when the margin is positive, 0 when negative, 0.5 for a tie (an unchanged model scores 0.5)."""
    m = np.asarray(margin, dtype=float)
    return np.where(m > 0, 1.0, np.where(m < 0, 0.0, 0.5))


def summarise(margin: np.ndarray) -> dict:
    m = np.asarray(margin, dtype=float)
    return {"pairs": int(m.size), "accuracy": float(correct(m).mean()) if m.size else float("nan"),
            "mean_margin": float(m.mean()) if m.size else float("nan"), "ties": int((m == 0).sum())}


def score_model(model_dir: str, records: list[dict], settings: dict) -> list[dict]:
    """reference_logps-style rows (pair id, both answers' summed log-probs) of the model in ``model_dir``."""
    from workflow.lib.models import load_model, load_tokenizer, placement
    from workflow.lib.pairs import score_pairs

    device, dtype = placement(settings["precision"])
    model = load_model(model_dir, dtype=dtype, device=device).eval()
    return score_pairs(model, load_tokenizer(model_dir), records, settings, desc="held-out log-probs")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", required=True, help="clean held-out pairs (results/data/preferences/heldout.jsonl)")
    p.add_argument("--reference", required=True, help="reference log-probs of the held-out pairs (reference_logps)")
    p.add_argument("--model", help="model folder to score; absent: the model is the reference (every margin 0)")
    p.add_argument("--beta", type=float, required=True, help="β of the model's method preset")
    p.add_argument("--training-json", default="{}", help="the config's training section as JSON (tokenisation, "
                   "batch size, precision: the same as training)")
    p.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "hh"], help="config model.prompt_format")
    p.add_argument("--tags-json", default="{}", help="labels copied into every row and the summary (method, noise, seed)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--output", required=True, help="per-pair scores (JSON lines)")
    p.add_argument("--summary", required=True, help="accuracy and mean margin (JSON)")
    a = p.parse_args(argv)
    if a.beta <= 0:
        raise SystemExit(f"--beta {a.beta}: β must be positive")

    records = read_jsonl(a.pairs)
    if not records:
        raise SystemExit(f"{a.pairs}: no held-out pairs (preferences.n_heldout is 0)")
    reference = pair_logps(read_jsonl(a.reference), records, a.reference)
    if a.model:
        import torch

        from workflow.lib.config import fill_defaults

        if a.threads:
            torch.set_num_threads(a.threads)
        settings = fill_defaults(json.loads(a.training_json), "training") | {"prompt_format": a.prompt_format}
        policy = pair_logps(score_model(a.model, records, settings), records, a.model)
    else:
        policy = reference.copy()
    margin = margins(policy, reference, a.beta)
    tags = json.loads(a.tags_json)
    rows = [{"pair_id": r["pair_id"], **tags, "logp_chosen": float(pc), "logp_rejected": float(pr),
             "ref_chosen": float(rc), "ref_rejected": float(rr), "margin": float(m), "correct": float(c)}
            for r, (pc, pr), (rc, rr), m, c in zip(records, policy, reference, margin, correct(margin))]
    summary = {**tags, "beta": a.beta, "model": a.model or "(the reference model)", **summarise(margin)}
    write_jsonl(a.output, rows)
    write_json(a.summary, summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
