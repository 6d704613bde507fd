"""Write every prompt of one evaluation benchmark (``all.jsonl``).

    python -m workflow.prepare_benchmark --name harmbench \
        --spec-json '{"source": {"path": "../shared/data/harmbench/harmbench_behaviors_text_all.csv"}, "prompt_column": "Behavior", "category_column": "SemanticCategory", "filter": {"FunctionalCategory": "standard"}}' \
        --all results/data/benchmarks/harmbench/all.jsonl

The sample the models answer is another rule's (``workflow.sample_benchmark``): changing the sample size
does not rewrite ``all.jsonl``, and the sample leaves out every prompt the probe data used.

A benchmark is either read from a source (a local CSV/JSON/JSONL/parquet file or folder, a hub id,
or a workflow output under ``results/``) with a prompt column, an optional category column, an
optional context column (HarmBench contextual behaviours: the context string is put before the
behaviour as HarmBench does) and an optional row filter; or it is another benchmark's prompts
wrapped in jailbreak templates (``jailbreak:``, see ``workflow/lib/wrap_jailbreaks.py``; pass the base
benchmark's ``all.jsonl`` with ``--base-prompts``).

``all.jsonl`` holds every prompt once (a prompt repeated in the source, after stripping and the context
join, is kept at its first row, as the official evaluation's ``set()`` does); it is what the probe data
are de-duplicated against when the benchmark is in ``probe.decontaminate_against``. ``sample.jsonl``
(``workflow.sample_benchmark``) is what the models answer: a seeded sample of ``all.jsonl`` minus every
prompt the probe data used. Records: ``id, prompt, category, behavior, context`` (+ ``template`` and
``base_prompt`` for wrapped sets); ``id`` is ``<name>-<row index in the source>``. ``prompt`` is what the
model is asked; ``behavior`` is the original request (the prompt column's text, without context or
jailbreak template) and ``context`` the context string or null: a judge that grades against the behaviour
(HarmBench's classifier) reads these two, not ``prompt``.
"""
from __future__ import annotations

import argparse
import json

from workflow.lib.config import fill_defaults
from workflow.lib.files import read_jsonl, write_jsonl
from workflow.lib.sources import SourceError, load_rows, require_columns
from workflow.lib.wrap_jailbreaks import wrap_prompts

# HarmBench joins a contextual behaviour's context and request like this (baselines' direct request).
CONTEXT_SEPARATOR = "\n\n---\n\n"


def benchmark_prompts(rows: list[dict], spec: dict, name: str) -> list[dict]:
    what = f"benchmarks.{name}"
    optional = [spec[k] for k in ("category_column", "context_column") if spec.get(k)]
    require_columns(rows, [spec["prompt_column"], *optional, *spec.get("filter", {})], what)
    out = []
    for i, row in enumerate(rows):
        if any(str(row[k]) != str(v) for k, v in spec.get("filter", {}).items()):
            continue
        prompt = row[spec["prompt_column"]]
        if not isinstance(prompt, str) or not prompt.strip():
            raise SourceError(f"{what}: row {i}: empty or non-text prompt in column {spec['prompt_column']!r}")
        behavior = prompt.strip()
        context = row[spec["context_column"]] if spec.get("context_column") else None
        context = context.strip() if isinstance(context, str) and context.strip() else None
        prompt = f"{context}{CONTEXT_SEPARATOR}{behavior}" if context else behavior
        category = row[spec["category_column"]] if spec.get("category_column") else ""
        if isinstance(category, (list, tuple)):  # some hub sets store a list of categories
            category = ",".join(map(str, category))
        out.append({"id": f"{name}-{i}", "prompt": prompt, "category": "" if category is None else str(category),
                    "behavior": behavior, "context": context})
    if not out:
        raise SourceError(f"{what}: no prompts left after filter {spec.get('filter')}")
    return unique_prompts(out)


def unique_prompts(records: list[dict]) -> list[dict]:
    """Each prompt once, at its first record: a repeated prompt would be answered and counted twice."""
    seen = set()
    return [r for r in records if not (r["prompt"] in seen or seen.add(r["prompt"]))]


def build_prompts(spec: dict, name: str, base_prompts: str | None = None) -> list[dict]:
    """Every prompt of one benchmark config entry (validated here, defaults filled)."""
    spec = fill_defaults(spec, f"benchmarks/{name}")
    if "jailbreak" in spec:
        if not base_prompts:
            raise SystemExit(f"benchmarks.{name}: a jailbreak-wrapped set needs --base-prompts (the base benchmark's all.jsonl)")
        jb = spec["jailbreak"]
        templates = load_rows(jb["templates"], what=f"benchmarks.{name}.jailbreak.templates")
        return wrap_prompts(read_jsonl(base_prompts), templates, jb, name)
    return benchmark_prompts(load_rows(spec["source"], what=f"benchmarks.{name}.source"), spec, name)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True)
    p.add_argument("--spec-json", required=True, help="the benchmark's config entry as JSON")
    p.add_argument("--base-prompts", help="all.jsonl of the base benchmark (jailbreak-wrapped sets only)")
    p.add_argument("--all", required=True)
    a = p.parse_args(argv)

    spec = json.loads(a.spec_json)
    prompts = build_prompts(spec, a.name, a.base_prompts)
    write_jsonl(a.all, prompts)
    print(json.dumps({"benchmark": a.name, "prompts": len(prompts)}))


if __name__ == "__main__":
    main()
