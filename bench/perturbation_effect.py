"""Is the sharpness-aware step effective on the real model? A short training run per method, its diagnostics.

    python bench/perturbation_effect.py [--methods shapo shapo_normalized] [--steps 10] [--interval 1] \
        [--precision fp32|bf16] [--out results/bench/perturbation]

Needs a prepared results folder (``snakemake --cores 2 --until reference_logps select_subspace``). Trains
each method of config.yaml (its preset, with ``interval`` overridden so that every step, or every k-th, is
sharpness-aware) for ``--steps`` optimizer steps on the first pairs of the noisy training set, with the
workflow's own training loop and the default training settings; writes each training log as
``<out>/<method>/noise<ε>/seed0.train_log.tsv``, then the per-method summary
(``workflow.perturbation``: perturbation.csv/.md, the verdict and its sentence) and the figure
(``workflow.figures.plot_perturbation``: perturbation_effect.png/.pdf) from them. ``--precision bf16``
runs the forward passes under bf16 autocast as on a GPU (slow on most CPUs).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=["shapo", "shapo_normalized"])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--interval", type=int, default=1, help="every k-th step sharpness-aware (overrides the preset)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--noise", default="0.4", help="noise rate of the training pairs (results/data/noisy/noise<ε>)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/bench/perturbation")
    a = p.parse_args(argv)

    import pandas as pd
    import torch

    from workflow.lib.config import validate_config
    from workflow.figures import plot_perturbation, save
    from workflow.lib.captions import figure_captions
    from workflow.lib.files import read_jsonl, write_tsv
    from workflow.lib.models import load_model, load_tokenizer
    from workflow.lib.parallel import DataParallel
    from workflow.lib.sharpness import matched_reference, perturbed_set
    from workflow.train_policy import attach_reference, train
    from workflow.lib.train_step import LOG_COLUMNS

    torch.set_num_threads(a.threads)
    config = validate_config(yaml.safe_load((ROOT / "config.yaml").read_text()))
    out = Path(a.out) / a.precision
    settings = dict(config["training"], precision=a.precision, prompt_format=config["model"]["prompt_format"])
    presets = json.loads(json.dumps(config["presets"]))
    for name in a.methods:
        presets[name]["sharpness"]["interval"] = a.interval
    records = read_jsonl(f"results/data/noisy/noise{a.noise}/seed0.jsonl")[: a.steps * settings["batch_size"]]
    attach_reference(records, read_jsonl("results/data/preferences/reference_logps.jsonl"), "reference_logps.jsonl")
    logs = []
    for method_name in a.methods:
        method = presets[method_name]
        torch.manual_seed(0)
        model = load_model("results/models/base")
        subspace = "results/subspace/neurons.safetensors"
        selected = perturbed_set(model, method["sharpness"], subspace, 0)
        log = train(model, load_tokenizer("results/models/base"), [dict(r) for r in records], method, settings, 0,
                    selected=selected, parallel=DataParallel(a.precision),
                    matched_to=matched_reference(model, method["sharpness"], subspace))
        path = out / method_name / f"noise{a.noise}" / "seed0.train_log.tsv"
        write_tsv(path, pd.DataFrame(log, columns=LOG_COLUMNS))
        logs.append(str(path))
        del model
    rep = config["report"]
    subprocess.run([sys.executable, "-m", "workflow.perturbation", "--train-logs", *logs,
                    "--presets-json", json.dumps(presets), "--methods", *a.methods,
                    "--inert-effective-fraction", str(rep["inert_effective_fraction"]),
                    "--inert-cosine-gap", str(rep["inert_cosine_gap"]),
                    "--table", str(out / "perturbation.csv"), "--markdown", str(out / "perturbation.md")],
                   check=True, cwd=ROOT)
    frames = [pd.read_csv(path, sep="\t").assign(method=m) for path, m in zip(logs, a.methods)]
    thresholds = rep["inert_effective_fraction"], rep["inert_cosine_gap"]
    save(plot_perturbation(pd.concat(frames), *thresholds), out / "perturbation_effect",
         figure_captions(rep["ci_level"], *thresholds)["perturbation_effect"])


if __name__ == "__main__":
    main()
