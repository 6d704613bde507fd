"""Engine choice, measured: TRL's stock DPOTrainer vs the workflow's own DPO loop, same settings.

    .venv/bin/pip install --no-deps -r bench/requirements.txt     # trl, bench only
    python bench/trl_step_time.py [--steps 7] [--out results/bench/trl_step_time.tsv]

Both engines train the embedded SmolLM2-135M-Instruct (fp32, via workflow.lib.models) with DPO
(sigmoid, β = 0.1), AdamW lr 5e-6 with linear decay and clipping 1.0, batch 4, max_length 128,
reference log-probs precomputed once, no gradient checkpointing, bf16 off, on the same HH-RLHF
harmless pairs: the first ``steps × 4`` whose chat-formatted prompt fits in 64 tokens, so TRL
drops none (it silently drops pairs whose prompt alone reaches max_length) and our loop cuts
none. Each engine runs in its own process (peak RSS is its own). The first step is warm-up; the
table gives the median and mean seconds of the others, the reference pre-computation time and
peak RSS, and is saved with a bar chart.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = "embedded:smollm2-135m-instruct"
DATA = ROOT.parent / "shared/data/hh-rlhf/harmless-base/test.jsonl.gz"
BETA, LR, MAX_LENGTH, MAX_PROMPT = 0.1, 5e-6, 128, 64


def bench_pairs(tokenizer, n: int) -> list[dict]:
    """The first n HH-RLHF harmless pairs whose formatted prompt has at most MAX_PROMPT tokens."""
    sys.path.insert(0, str(ROOT))
    from workflow.lib.models import format_prompt
    from workflow.prepare_preferences import hh_records
    from workflow.lib.sources import load_rows

    records, _ = hh_records(load_rows({"path": str(DATA)}), "bench data")
    fits = [r for r in records
            if len(tokenizer(format_prompt(tokenizer, r["messages"]), add_special_tokens=False)["input_ids"]) <= MAX_PROMPT]
    if len(fits) < n:
        raise SystemExit(f"{DATA}: only {len(fits)} pairs have prompts of at most {MAX_PROMPT} tokens; need {n}")
    return fits[:n]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ours(a) -> dict:
    import torch

    from workflow.lib.models import load_source_model
    from workflow.lib.pairs import score_pairs
    from workflow.lib.config import fill_defaults
    from workflow.train_policy import attach_reference, train

    model, tokenizer = load_source_model(a.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    records = bench_pairs(tokenizer, a.steps * a.batch_size)
    settings = fill_defaults({"batch_size": a.batch_size, "epochs": 1, "lr": LR, "warmup_ratio": 0.0, "schedule": "linear",
                              "max_grad_norm": 1.0, "max_length": MAX_LENGTH, "max_prompt_length": MAX_PROMPT},
                             "training") | {"prompt_format": "auto"}
    t0 = time.perf_counter()  # tokenisation is inside score_pairs and train, as TRL's is inside its constructor
    model.eval()
    with torch.no_grad():
        attach_reference(records, score_pairs(model, tokenizer, records, settings), "precomputed")
    precompute = time.perf_counter() - t0
    log = train(model, tokenizer, records, fill_defaults({"loss": "dpo", "beta": BETA}, "presets/*"), settings, seed=0)
    return summary("ours (workflow.train_policy)", [r["seconds"] for r in log], precompute, len(records))


def run_trl(a) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from workflow.lib.models import load_source_model

    model, tokenizer = load_source_model(a.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    records = bench_pairs(tokenizer, a.steps * a.batch_size)
    data = Dataset.from_list([{"prompt": r["messages"], "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in records])

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.start = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.start)

    timer = StepTimer()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(output_dir=out, per_device_train_batch_size=a.batch_size, max_steps=a.steps,
                           learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, max_grad_norm=1.0,
                           beta=BETA, loss_type="sigmoid", max_length=MAX_LENGTH, precompute_ref_log_probs=True,
                           gradient_checkpointing=False, bf16=False, use_cpu=True, report_to=[],
                           save_strategy="no", logging_steps=1, seed=0, dataloader_num_workers=0)
        t0 = time.perf_counter()  # TRL tokenises and precomputes the reference log-probs in its constructor
        trainer = DPOTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                             callbacks=[timer])
        precompute = time.perf_counter() - t0
        kept = len(trainer.train_dataset)
        trainer.train()
    if kept != len(records):
        print(f"warning: TRL kept {kept} of {len(records)} pairs", file=sys.stderr)
    return summary(f"TRL {__import__('trl').__version__} DPOTrainer", timer.seconds, precompute, kept)


def summary(engine: str, seconds: list[float], precompute: float, pairs: int) -> dict:
    timed = seconds[1:]
    return {"engine": engine, "steps": len(seconds), "pairs": pairs, "median_s_per_step": statistics.median(timed),
            "mean_s_per_step": statistics.mean(timed), "first_step_s": seconds[0],
            "setup_with_reference_s": precompute, "peak_rss_mb": peak_rss_mb()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=MODEL, help="model as in config model.name_or_path (default: the embedded one)")
    p.add_argument("--steps", type=int, default=7, help="optimizer steps per engine (the first is warm-up)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="results/bench/trl_step_time.tsv")
    p.add_argument("--one", choices=["ours", "trl"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        import torch

        sys.path.insert(0, str(ROOT))
        torch.set_num_threads(a.threads)
        torch.manual_seed(0)
        print(json.dumps((run_ours if a.one == "ours" else run_trl)(a)))
        return

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    rows = []
    for engine in ("ours", "trl"):
        cmd = [sys.executable, __file__, "--one", engine, *(argv if argv is not None else sys.argv[1:])]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"{engine} failed:\n{proc.stderr[-4000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table["ratio_to_ours"] = table["median_s_per_step"] / table["median_s_per_step"].iloc[0]
    out = ROOT / a.out
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, sep="\t", index=False)
    print(table.to_string(index=False))
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar(table["engine"], table["median_s_per_step"])
    ax.set(ylabel="median s / optimizer step", title=f"DPO step, SmolLM2-135M, batch {a.batch_size}, CPU")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=150)
    print(f"saved {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
