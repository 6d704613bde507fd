"""Write one evaluation benchmark's prompts, and a seeded sample of them for generation.

    python -m workflow.prepare_benchmark --name harmbench \
        --spec-json '{"source": {"path": "../shared/data/harmbench/harmbench_behaviors_text_all.csv"}, "prompt_column": "Behavior", "category_column": "SemanticCategory", "filter": {"FunctionalCategory": "standard"}}' \
        --n-sample 48 --seed 0 --all results/data/benchmarks/harmbench/all.jsonl --sample results/data/benchmarks/harmbench/sample.jsonl

``all.jsonl`` (every prompt) is what the probe set is de-duplicated against; ``sample.jsonl``
is what the models answer. Records: ``id, prompt, category``.
"""
from __future__ import annotations

import argparse
import json
import random

from workflow.files import write_jsonl
from workflow.sources import SourceError, load_rows, require_columns


def benchmark_prompts(rows: list[dict], spec: dict, name: str) -> list[dict]:
    what = f"benchmarks.{name}"
    columns = [spec["prompt_column"]] + ([spec["category_column"]] if spec.get("category_column") else [])
    require_columns(rows, columns + list(spec.get("filter", {})), what)
    out = []
    for i, row in enumerate(rows):
        if any(str(row[k]) != str(v) for k, v in spec.get("filter", {}).items()):
            continue
        prompt = row[spec["prompt_column"]]
        if not isinstance(prompt, str) or not prompt.strip():
            raise SourceError(f"{what}: row {i}: empty or non-text prompt in column {spec['prompt_column']!r}")
        out.append({"id": f"{name}-{i}", "prompt": prompt.strip(),
                    "category": str(row[spec["category_column"]]) if spec.get("category_column") else ""})
    if not out:
        raise SourceError(f"{what}: no prompts left after filter {spec.get('filter')}")
    return out


def sample_prompts(prompts: list[dict], n: int, seed: int) -> list[dict]:
    """A seeded sample of ``n`` prompts (all of them when ``n`` is 0 or too large), in file order."""
    if n <= 0 or n >= len(prompts):
        return list(prompts)
    keep = sorted(random.Random(seed).sample(range(len(prompts)), n))
    return [prompts[i] for i in keep]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--spec-json", required=True, help="the benchmark's config entry as JSON")
    p.add_argument("--n-sample", type=int, required=True, help="prompts to answer (0 = all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--all", required=True)
    p.add_argument("--sample", required=True)
    a = p.parse_args(argv)

    spec = json.loads(a.spec_json)
    prompts = benchmark_prompts(load_rows(spec["source"], what=f"benchmarks.{a.name}.source"), spec, a.name)
    sample = sample_prompts(prompts, a.n_sample, a.seed)
    write_jsonl(a.all, prompts)
    write_jsonl(a.sample, sample)
    print(json.dumps({"benchmark": a.name, "prompts": len(prompts), "sampled": len(sample)}))


if __name__ == "__main__":
    main()
