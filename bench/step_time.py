"""Seconds per optimizer step and peak memory: DPO vs ShaPO (interval 1 and 5) on the same model and data.

    python bench/step_time.py [--model results/models/base] [--steps 10] [--out results/bench/step_time.tsv]

Needs a finished default run (base model, training pairs, reference log-probs, subspace). Each
variant trains in its own process (so peak RSS is its own) on the same pairs, batch and seed,
with the workflow's own training loop; the first step is left out of the timing (warm-up).
Prints a table, the ShaPO/DPO ratios, and the extra memory a sharpness-aware step needs by
construction (the saved slices of the perturbed weights), and saves the table and a PNG.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPO = {"subspace": "probe", "perturbation": "raw", "gamma_min": 2e-6, "gamma_max": 4e-6}
VARIANTS = {
    "dpo": {"loss": "dpo", "beta": 0.1},
    "shapo_interval5": {"loss": "dpo", "beta": 0.1, "sharpness": {"interval": 5, **SHAPO}},
    "shapo_interval1": {"loss": "dpo", "beta": 0.1, "sharpness": {"interval": 1, **SHAPO}},
    # the same without the gradient-cosine diagnostic (the one that holds a second gradient)
    "shapo_interval1_nocosine": {"loss": "dpo", "beta": 0.1,
                                 "sharpness": {"interval": 1, **SHAPO, "gradient_cosine": False}},
}


def run_one(a) -> dict:
    """Train one variant in this process; return its timings and peak RSS."""
    import torch

    sys.path.insert(0, str(ROOT))
    from workflow.lib.files import read_jsonl
    from workflow.lib.models import load_model, load_tokenizer
    from workflow.lib.config import fill_defaults
    from workflow.lib.sharpness import perturbed_set
    from workflow.train_policy import attach_reference, train

    torch.set_num_threads(a.threads)
    method = fill_defaults(VARIANTS[a.one], "presets/*")
    settings = fill_defaults({"batch_size": a.batch_size, "epochs": 1, "lr": 5e-6, "warmup_ratio": 0.0, "max_length": 128,
                              "max_prompt_length": 64}, "training") | {"prompt_format": "auto"}
    records = read_jsonl(a.pairs)[: a.steps * a.batch_size]
    attach_reference(records, read_jsonl(a.reference), a.reference)
    model = load_model(a.model)
    selected = perturbed_set(model, method["sharpness"], a.subspace, 0) if "sharpness" in method else None
    log = train(model, load_tokenizer(a.model), records, method, settings, seed=0, selected=selected)
    seconds = [r["seconds"] for r in log[1:]]
    extra = sum(s.weight.index_select(s.axis, s.index).numel() * s.weight.element_size() for s in selected or [])
    return {"variant": a.one, "steps_timed": len(seconds), "median_s_per_step": statistics.median(seconds),
            "mean_s_per_step": statistics.mean(seconds),
            "sharpness_steps": sum(r["sharpness_step"] for r in log[1:]),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "perturbation_saved_mb": extra / 2**20}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="results/models/base")
    p.add_argument("--pairs", default="results/data/noisy/noise0.4/seed0.jsonl")
    p.add_argument("--reference", default="results/data/preferences/reference_logps.jsonl")
    p.add_argument("--subspace", default="results/subspace/neurons.safetensors")
    p.add_argument("--steps", type=int, default=11, help="optimizer steps per variant (the first is not timed)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/bench/step_time.tsv")
    p.add_argument("--one", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(run_one(a)))
        return

    import pandas as pd

    rows = []
    for name in VARIANTS:
        cmd = [sys.executable, __file__, "--one", name, *(argv if argv is not None else sys.argv[1:])]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    dpo = table.set_index("variant").loc["dpo", "median_s_per_step"]
    table["ratio_to_dpo"] = table["mean_s_per_step"] / table.set_index("variant").loc["dpo", "mean_s_per_step"]
    print(table.round(3).to_string(index=False))
    print(f"DPO median {dpo:.2f} s/step; ratios use mean s/step (interval 5 mixes plain and sharpness-aware steps)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(a.out, sep="\t", index=False)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(table.variant, table.mean_s_per_step)
    for x, (v, r) in enumerate(zip(table.mean_s_per_step, table.ratio_to_dpo)):
        ax.text(x, v, f"{r:.2f}×", ha="center", va="bottom")
    ax.set_ylabel("mean s / optimizer step")
    ax.set_title("step time on this machine (CPU)")
    fig.tight_layout()
    fig.savefig(Path(a.out).with_suffix(".png"), dpi=120)


if __name__ == "__main__":
    main()
