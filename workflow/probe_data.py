"""Build the probe's unsafe-vs-safe text set, de-duplicated against the declared evaluation prompts.

    python -m workflow.probe_data --spec-json '{"unsafe": {"path": ...}, "safe": {"path": ...}, "text_column": "instruction", "n_per_class": 256, "seed": 0}' \
        --exclude harmbench=results/data/benchmarks/harmbench/all.jsonl --exclude preferences_heldout=... \
        --output results/probe/data.jsonl --report results/probe/decontamination.tsv

Subspace selection must be decided on data disjoint from the evaluation, and the default
source (refusal-direction instructions) shares prompts with AdvBench and HarmBench, so any
text whose normalised form equals an excluded prompt is removed and the count reported.
The workflow excludes the held-out preference prompts and the benchmarks listed in
``probe.decontaminate_against`` (not every defined benchmark: adding one later must not
rebuild the probe). A benchmark not listed is decontaminated the other way round by
``workflow.sample_benchmark``, which drops from its evaluated prompts every prompt recorded
here (docs/benchmarks.md).

With ``"format": "pku-saferlhf"`` the spec has one ``source`` of PKU-SafeRLHF rows instead: each
response is a text, ``template`` filled with the row's prompt and response (default: the official
``\n\nHuman: {prompt}\n\nAssistant:{response}``), labelled by ``is_response_<i>_safe`` (the paper's
probe); rows whose prompt is an excluded prompt are dropped. Each such text carries its row's index
as ``pair``, so that train_probe can drop a pair whole under the length rule.

``sample: balanced`` keeps a seeded sample of ``n_per_class`` texts per class; ``sample: all`` keeps
every text, unbalanced, in a seeded order (the official probe set). See docs/probe.md.

Output rows: ``text, label, prompt`` (+ ``pair``); ``prompt`` is the prompt the text was built from (the
text itself for format texts), which is what a benchmark prompt is compared with afterwards.
"""
from __future__ import annotations

import argparse
import json
import random
import re

import pandas as pd

from workflow.lib.checks import check_probe_data
from workflow.lib.config import fill_defaults
from workflow.lib.decontamination import SAFE, UNSAFE, assert_disjoint, decontaminate, normalise
from workflow.lib.files import read_jsonl, write_jsonl, write_tsv
from workflow.lib.sources import SourceError, load_rows, require_columns


def load_texts(source: dict, column: str, what: str) -> list[str]:
    rows = load_rows(source, what=what)
    require_columns(rows, [column], what)
    texts = [str(r[column]).strip() for r in rows if str(r[column]).strip()]
    return list(dict.fromkeys(texts))  # exact duplicates within a class carry no information


def render(template: str, prompt: str, response: str) -> str:
    """``template`` with ``{prompt}`` and ``{response}`` replaced in one pass (so braces inside the
    prompt are never read as a placeholder)."""
    values = {"prompt": prompt, "response": response}
    return re.sub(r"\{(prompt|response)\}", lambda m: values[m[1]], template)


def pku_response_texts(rows: list[dict], excluded: dict[str, list[str]], what: str, template: str):
    """PKU-SafeRLHF rows -> ({"unsafe": texts, "safe": texts}, removed per excluded set, prompts kept,
    {text: index of the row it first came from}, {text: the (stripped) prompt it was built from}).

    Each response is one text, ``template`` filled with the row's prompt and response as they are
    (the official probe does not strip them), labelled by ``is_response_<i>_safe``; a text repeated
    within a class is kept once. A row whose prompt matches an excluded prompt (a benchmark or a
    held-out preference prompt, which may come from the same data set) is dropped whole and counted per set.
    """
    columns = ["prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe"]
    require_columns(rows, columns, what)
    banned = {name: {normalise(p) for p in prompts} for name, prompts in excluded.items()}
    removed = {name: 0 for name in excluded}
    texts = {"unsafe": [], "safe": []}
    pair_of, prompt_of = {}, {}
    prompts = []
    for i, row in enumerate(rows):
        prompt = str(row["prompt"]).strip()
        hits = [name for name, b in banned.items() if normalise(prompt) in b]
        for name in hits:
            removed[name] += 1
        if hits:
            continue
        prompts.append(prompt)
        for k in (0, 1):
            flag = row[f"is_response_{k}_safe"]
            if not isinstance(flag, bool) and flag not in (0, 1, "true", "false", "True", "False"):
                raise SourceError(f"{what}: row {i}: is_response_{k}_safe must be true or false, got {flag!r}")
            response = str(row[f"response_{k}"])
            if response.strip():
                text = render(template, str(row["prompt"]), response)
                texts["safe" if str(flag).lower() in ("true", "1") else "unsafe"].append(text)
                pair_of.setdefault(text, i)
                prompt_of.setdefault(text, prompt)
    return ({c: list(dict.fromkeys(t)) for c, t in texts.items()}, removed, prompts, pair_of, prompt_of)


def build_probe_set(unsafe: list[str], safe: list[str], n_per_class: int, seed: int, sample: str,
                    pair_of: dict[str, int] | None = None, prompt_of: dict[str, str] | None = None) -> list[dict]:
    """The probe rows ``{"text", "label", "prompt"[, "pair"]}`` in a seeded order.

    ``balanced``: ``min(n_per_class, |unsafe|, |safe|)`` texts per class, a seeded sample; ``all``: every
    text of both classes. With ``pair_of`` (PKU rows) each row carries the index of its source pair. Each
    row records the ``prompt`` its text was built from (``prompt_of``; the text itself when absent).
    """
    prompt_of = prompt_of or {}
    rng = random.Random(seed)
    if sample == "balanced":
        n = min(n_per_class, len(unsafe), len(safe))
        unsafe, safe = rng.sample(unsafe, n), rng.sample(safe, n)
    elif sample != "all":
        raise ValueError(f"probe.data.sample: {sample!r}; expected balanced or all")
    rows = [{"text": t, "label": UNSAFE} for t in unsafe] + [{"text": t, "label": SAFE} for t in safe]
    rows = [r | {"prompt": prompt_of.get(r["text"], r["text"])} for r in rows]
    if pair_of is not None:
        rows = [r | {"pair": pair_of[r["text"]]} for r in rows]
    rng.shuffle(rows)
    return rows


def all_removed_message(what: str, label: str, removed: dict[str, int]) -> str:
    """Why no text of a class is left, naming the excluded sets that took them (e.g. the same data set)."""
    took = ", ".join(f"{b}: {n}" for b, n in removed.items() if n) or "none"
    return (f"{what}: no {label} texts left after de-duplication (removed per excluded set: {took}). If the probe"
            " source and a benchmark are the same data (e.g. both the PKU-SafeRLHF-30K test split), take the probe"
            " from another split, or drop that benchmark from probe.decontaminate_against: its prompts that the probe"
            " uses are then removed from the benchmark's sample instead")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec-json", required=True, help="the config's probe.data entry as JSON")
    p.add_argument("--exclude", action="append", default=[], metavar="NAME=FILE",
                   help="a prompt file (jsonl with 'prompt': a benchmark's all.jsonl, the held-out preference prompts)"
                   " to de-duplicate against; repeatable")
    p.add_argument("--output", required=True)
    p.add_argument("--report", required=True)
    a = p.parse_args(argv)

    spec = fill_defaults(json.loads(a.spec_json), "probe/data")
    check_probe_data(spec)
    excluded = {}
    for item in a.exclude:
        name, _, path = item.partition("=")
        excluded[name] = [r["prompt"] for r in read_jsonl(path)]
    report = []
    classes = {}
    pair_of, prompt_of = None, {}
    if spec["format"] == "pku-saferlhf":
        what = f"probe.data.source ({spec['source'].get('path') or spec['source'].get('hub')})"
        rows = load_rows(spec["source"], what=what)
        classes, removed, prompts, pair_of, prompt_of = pku_response_texts(rows, excluded, what, spec["template"])
        assert_disjoint(prompts, excluded, what)
        report += [{"class": "rows", "benchmark": b, "removed": n, "read": len(rows), "kept": len(prompts)}
                   for b, n in removed.items()]
        for label in ("unsafe", "safe"):
            if not classes[label]:
                raise SourceError(all_removed_message(what, label, removed))
    else:
        for label in ("unsafe", "safe"):
            texts = load_texts(spec[label], spec["text_column"], f"probe.data.{label}")
            kept, removed = decontaminate(texts, excluded)
            assert_disjoint(kept, excluded, f"probe.data.{label}")
            if not kept:
                raise SourceError(all_removed_message(f"probe.data.{label}", label, removed))
            classes[label] = kept
            report += [{"class": label, "benchmark": b, "removed": n, "read": len(texts), "kept": len(kept)}
                       for b, n in removed.items()]
    rows = build_probe_set(classes["unsafe"], classes["safe"], spec["n_per_class"], spec["seed"], spec["sample"],
                           pair_of, prompt_of)
    write_jsonl(a.output, rows)
    write_tsv(a.report, pd.DataFrame(report, columns=["class", "benchmark", "removed", "read", "kept"]))
    print(json.dumps({"probe_texts": len(rows), "removed": report}))


if __name__ == "__main__":
    main()
