"""The seeded sample of a benchmark's prompts that the models answer.

    python -m workflow.sample_benchmark --all results/data/benchmarks/harmbench/all.jsonl \
        --n-sample 24 --seed 0 --sample results/data/benchmarks/harmbench/sample.jsonl

A rule of its own, apart from ``prepare_benchmark``: changing the sample size rewrites only
``sample.jsonl``, not ``all.jsonl``, so the probe (de-duplicated against ``all.jsonl``), the
subspace and the ShaPO policies are not rerun.
"""
from __future__ import annotations

import argparse
import json

from workflow.config import schema_default
from workflow.files import read_jsonl, write_jsonl
from workflow.prepare_benchmark import sample_prompts
from workflow.sources import SourceError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--all", required=True, help="all.jsonl written by prepare_benchmark")
    p.add_argument("--n-sample", type=int, required=True, help="prompts to answer (0 = all)")
    p.add_argument("--seed", type=int, default=schema_default("evaluation/seed"))
    p.add_argument("--sample", required=True)
    a = p.parse_args(argv)
    prompts = read_jsonl(a.all)
    if not prompts:
        raise SourceError(f"{a.all}: no prompts (expected the benchmark's prompts, one JSON object per line)")
    sample = sample_prompts(prompts, a.n_sample, a.seed)
    write_jsonl(a.sample, sample)
    print(json.dumps({"prompts": len(prompts), "sampled": len(sample)}))


if __name__ == "__main__":
    main()
