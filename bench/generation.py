"""Generation throughput: tokens/s batched (16 prompts a batch) vs one prompt at a time.

    python bench/generation.py [--model embedded:smollm2-135m-instruct] [--prompts 32] [--max-new-tokens 64] \
        [--out results/bench/generation]

Same model, prompts, greedy decoding and thread count for both; the workflow's own
``generate_texts`` (length-sorted, left-padded batches). Tokens are the generated answer tokens up
to the first end-of-sequence token (padding after it is not counted). Prompts are the first N
harmless instructions of refusal-direction harmless_test (../shared/data). Prints a table and the
speed-up, and saves ``<out>.json`` and ``<out>.png``. The goal is a speed-up of at least 5x.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct", help="model.name_or_path or a prepared folder")
    p.add_argument("--data", default=str(ROOT.parent / "shared/data/refusal-direction/harmless_test.json"))
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "results/bench/generation"))
    a = p.parse_args(argv)

    import torch

    sys.path.insert(0, str(ROOT))
    from workflow.lib.files import json_text
    from workflow.lib.textgen import generate_texts
    from workflow.lib.models import format_prompt, load_model, load_source_model, load_tokenizer

    torch.set_num_threads(a.threads)
    if Path(a.model).is_dir():
        model, tokenizer = load_model(a.model), load_tokenizer(a.model, padding_side="left")
    else:
        model, tokenizer = load_source_model(a.model)
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
        tokenizer.padding_side = "left"
    model.eval()
    instructions = [r["instruction"] for r in json.loads(Path(a.data).read_text())[:a.prompts]]
    texts = [format_prompt(tokenizer, [{"role": "user", "content": t}]) for t in instructions]
    generate_texts(model, tokenizer, texts[:2], 4, 2)  # warm-up, untimed

    results = {}
    for name, batch in (("one_at_a_time", 1), (f"batched_{a.batch_size}", a.batch_size)):
        t0 = time.perf_counter()
        answers, counts = generate_texts(model, tokenizer, texts, a.max_new_tokens, batch)
        seconds = time.perf_counter() - t0
        results[name] = {"batch_size": batch, "seconds": round(seconds, 2), "tokens": sum(counts),
                         "tokens_per_s": round(sum(counts) / seconds, 2)}
        print(f"{name:>16}: {sum(counts)} tokens in {seconds:.1f} s = {sum(counts) / seconds:.1f} tokens/s", flush=True)
    one, many = results["one_at_a_time"], results[f"batched_{a.batch_size}"]
    speedup = many["tokens_per_s"] / one["tokens_per_s"]
    print(f"speed-up batched/one-at-a-time: {speedup:.2f}x (goal >= 5x)")
    record = {"model": a.model, "prompts": len(texts), "max_new_tokens": a.max_new_tokens, "threads": a.threads,
              "torch": torch.__version__, "results": results, "speedup": round(speedup, 2)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json_text(record, indent=2) + "\n")  # standard JSON: NaN as null

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.5, 3))
    ax.bar(list(results), [r["tokens_per_s"] for r in results.values()], color=["#999999", "#1f77b4"])
    ax.set_ylabel("generated tokens / s")
    ax.set_title(f"{Path(a.model).name}, {len(texts)} prompts, {a.threads} threads: {speedup:.1f}x", fontsize=9)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=120)
    print(f"saved {out.with_suffix('.json')} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
