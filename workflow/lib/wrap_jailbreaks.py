"""A distribution-shift benchmark: a base benchmark's prompts wrapped in in-the-wild jailbreak templates.

Used by ``workflow.prepare_benchmark`` for config entries with a ``jailbreak:`` block::

    harmbench_jailbreak:
      jailbreak:
        benchmark: harmbench                 # base benchmark (its all.jsonl)
        templates: {path: ../shared/data/jailbreak-templates/inthewild_jailbreak_llms.json}
        template_column: text                # a JSON list of strings is read as rows {"text": ...}
        placeholder: "[INSERT PROMPT HERE]"  # only templates with this slot are used
        n_templates: 4                       # seeded sample of templates
        seed: 0

Every base prompt is put into every sampled template (so the wrapped set has
n_base x n_templates prompts; ``evaluation.n_prompts`` then samples from it). The base prompt's
category, behaviour and context are kept (a judge that grades against the original behaviour, like
HarmBench's classifier, reads those, not the wrapped prompt), the template's index in the template
file is recorded, so harmful rates can be split by template, and ``base_prompt`` is the unwrapped prompt.
"""
from __future__ import annotations

import random

from workflow.lib.config import fill_defaults
from workflow.lib.sources import SourceError, require_columns


def usable_templates(rows: list[dict], column: str, placeholder: str, what: str) -> list[tuple[int, str]]:
    """(index in the file, template) of every template with the placeholder slot."""
    require_columns(rows, [column], what)
    found = [(i, r[column]) for i, r in enumerate(rows) if isinstance(r[column], str) and placeholder in r[column]]
    if not found:
        raise SourceError(f"{what}: no template contains the placeholder {placeholder!r} (column {column!r})")
    return found


def sample_templates(templates: list[tuple[int, str]], n: int, seed: int, what: str) -> list[tuple[int, str]]:
    """A seeded sample of ``n`` templates in file order."""
    if n > len(templates):
        raise SourceError(f"{what}: n_templates {n} exceeds the {len(templates)} templates with the placeholder")
    keep = sorted(random.Random(seed).sample(range(len(templates)), n))
    return [templates[i] for i in keep]


def wrap(template: str, prompt: str, placeholder: str) -> str:
    """The template with every placeholder slot replaced by the prompt."""
    return template.replace(placeholder, prompt)


def wrap_prompts(base: list[dict], template_rows: list[dict], spec: dict, name: str) -> list[dict]:
    """Every base prompt in every sampled template: records id, prompt, category, behavior, context, template.

    ``spec`` is the benchmark's ``jailbreak`` entry (validated here, defaults filled). ``base`` rows are the
    base benchmark's records (prepare_benchmark), which carry the original ``behavior`` and ``context``."""
    what = f"benchmarks.{name}.jailbreak"
    spec = fill_defaults(spec, f"benchmarks/{name}/jailbreak")
    placeholder = spec["placeholder"]
    templates = usable_templates(template_rows, spec["template_column"], placeholder, what)
    chosen = sample_templates(templates, spec["n_templates"], spec["seed"], what)
    if not base:
        raise SourceError(f"{what}: the base benchmark {spec['benchmark']!r} has no prompts")
    for i, row in enumerate(base):
        if not isinstance(row.get("behavior"), str):
            raise SourceError(f"{what}: base benchmark {spec['benchmark']!r} row {i} (id {row.get('id')!r}) has no "
                              "'behavior' (its all.jsonl predates it: rerun prepare_benchmark for it)")
    # base_prompt: the request inside the template, so a base prompt the probe used is found in the wrapped set too
    return [{"id": f"{name}-t{t_index}-{row['id']}", "prompt": wrap(template, row["prompt"], placeholder),
             "category": row.get("category", ""), "behavior": row["behavior"], "context": row.get("context"),
             "template": t_index, "base_prompt": row["prompt"]}
            for t_index, template in chosen for row in base]
