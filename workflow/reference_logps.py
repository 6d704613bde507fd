"""Score every training answer once under the frozen reference (base) model.

    python -m workflow.reference_logps --model results/models/base --pairs results/data/preferences/train.jsonl \
        --training-json '{"max_length": 128, "max_prompt_length": 64, "batch_size": 4}' --prompt-format auto \
        --output results/data/preferences/reference_logps.jsonl

Flipping a pair only swaps its two answers, so one pass over the clean set serves every noise
rate, seed and method. Log-probs are keyed by pair id and answer text (``pairs.text_key``).
"""
from __future__ import annotations

import argparse
import json

import torch

from workflow.lib.config import fill_defaults
from workflow.lib.files import read_jsonl, write_jsonl
from workflow.lib.models import load_model, load_tokenizer, placement
from workflow.lib.pairs import score_pairs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--pairs", required=True)
    p.add_argument("--training-json", required=True, help="the config's training section as JSON")
    p.add_argument("--prompt-format", required=True, choices=["auto", "chat", "hh"], help="config model.prompt_format")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)

    settings = fill_defaults(json.loads(a.training_json), "training") | {"prompt_format": a.prompt_format}
    device, dtype = placement(settings["precision"])
    model = load_model(a.model, dtype=dtype, device=device).eval()
    rows = score_pairs(model, load_tokenizer(a.model), read_jsonl(a.pairs), settings)
    write_jsonl(a.output, rows)
    print(json.dumps({"pairs": len(rows), "truncated": sum(r["truncated"] for r in rows)}))


if __name__ == "__main__":
    main()
