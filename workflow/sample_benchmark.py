"""The seeded sample of a benchmark's prompts that the models answer, without any prompt the probe used.

    python -m workflow.sample_benchmark --name harmbench --all results/data/benchmarks/harmbench/all.jsonl \
        --probe-data results/probe/data.jsonl --n-sample 24 --seed 0 \
        --sample results/data/benchmarks/harmbench/sample.jsonl \
        --decontamination results/data/benchmarks/harmbench/decontamination.json

Files of one benchmark (``results/data/benchmarks/<name>/``):

- ``all.jsonl`` (``workflow.prepare_benchmark``): every prompt of the benchmark, duplicates once.
  What the probe data are de-duplicated against when the benchmark is listed in
  ``probe.decontaminate_against``.
- ``sample.jsonl`` (here): the seeded sample of ``n`` prompts (0 = all) drawn from ``all.jsonl``
  minus every prompt the probe data used (``workflow.lib.decontamination.probe_overlap``: a probe row's
  prompt or text, compared in normalised form; for a jailbreak-wrapped prompt, also the prompt inside
  the template). This is what every model answers and every judge scores, so no prompt the probe was
  trained on is ever scored, whenever the benchmark was added.
- ``decontamination.json`` (here): prompts read, how many and which were removed because the probe
  used them, how many were left and sampled; the report's second decontamination table.

A rule of its own, apart from ``prepare_benchmark``: changing the sample size rewrites only
``sample.jsonl``, not ``all.jsonl``, so the probe, the subspace and the ShaPO policies are not
rerun. It reads the finished probe data, never the other way round, so adding a benchmark after
the probe is built reruns nothing upstream of generation (docs/benchmarks.md).

When every prompt of a benchmark is in the probe data the job stops and says the two ways out.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from workflow.lib.config import schema_default
from workflow.lib.decontamination import probe_overlap
from workflow.lib.files import read_jsonl, write_json, write_jsonl
from workflow.lib.sources import SourceError

SHOWN = 5  # removed prompts quoted in the log and the error


def sample_prompts(prompts: list[dict], n: int, seed: int) -> list[dict]:
    """A seeded sample of ``n`` prompts (all of them when ``n`` is 0 or too large), in file order."""
    if n <= 0 or n >= len(prompts):
        return list(prompts)
    keep = sorted(random.Random(seed).sample(range(len(prompts)), n))
    return [prompts[i] for i in keep]


def all_removed_message(name: str, n: int, probe_data: str, removed: list[dict]) -> str:
    """Every prompt of the benchmark is in the probe data: what happened and the two ways out."""
    shown = "; ".join(repr(r["prompt"][:80]) for r in removed[:SHOWN])
    return (f"benchmarks.{name}: all {n} prompts are in the probe data ({probe_data}), e.g. {shown}; nothing is left"
            " to evaluate. Either list the benchmark in probe.decontaminate_against (the probe data are then"
            " de-duplicated against it), or build the probe from data disjoint from it (probe.data); both rebuild the"
            " probe, the subspace and the policies that read it")


def decontaminated_sample(prompts: list[dict], probe_rows: list[dict], n: int, seed: int):
    """(sample, removed): the seeded sample of ``n`` prompts among those the probe did not use."""
    kept, removed = probe_overlap(prompts, probe_rows)
    return sample_prompts(kept, n, seed), removed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", help="benchmark name, for messages (default: the all.jsonl folder's name)")
    p.add_argument("--all", required=True, help="all.jsonl written by prepare_benchmark")
    p.add_argument("--probe-data", help="results/probe/data.jsonl: its prompts are not evaluated (omit: none removed)")
    p.add_argument("--n-sample", type=int, required=True, help="prompts to answer (0 = all)")
    p.add_argument("--seed", type=int, default=schema_default("evaluation/seed"))
    p.add_argument("--sample", required=True)
    p.add_argument("--decontamination", help="write the counts and the removed prompts here (JSON)")
    a = p.parse_args(argv)
    name = a.name or Path(a.all).parent.name

    prompts = read_jsonl(a.all)
    if not prompts:
        raise SourceError(f"{a.all}: no prompts (expected the benchmark's prompts, one JSON object per line)")
    probe_rows = read_jsonl(a.probe_data) if a.probe_data else []
    sample, removed = decontaminated_sample(prompts, probe_rows, a.n_sample, a.seed)
    if not sample:
        raise SourceError(all_removed_message(name, len(prompts), a.probe_data, removed))
    if removed:
        print(f"benchmarks.{name}: {len(removed)} of {len(prompts)} prompts are in the probe data and are not evaluated,"
              f" e.g. {[r['prompt'][:80] for r in removed[:SHOWN]]}")
    summary = {"benchmark": name, "prompts": len(prompts), "removed_probe_overlap": len(removed),
               "evaluable": len(prompts) - len(removed), "sampled": len(sample),
               "removed": [{"id": r["id"], "prompt": r["prompt"]} for r in removed]}
    write_jsonl(a.sample, sample)
    if a.decontamination:
        write_json(a.decontamination, summary)
    print(json.dumps({k: v for k, v in summary.items() if k != "removed"}))


if __name__ == "__main__":
    main()
