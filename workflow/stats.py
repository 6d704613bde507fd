"""Statistics of the judged answers: rates with bootstrap CIs, paired comparisons with a reference method.

    python -m workflow.stats --judgements results/judgements/*/*/*.jsonl ... --primary-judge refusal_markers \
        --reference-method dpo --n-bootstrap 2000 --seed 0 --tables results/tables

Every judgement file ``results/judgements/{judge}/{model}/{benchmark}.jsonl`` is read with its summary
(``.json``, which carries method, noise, seed, kind, judge type). The metric of a benchmark is its harmful
rate (``kind: harmful``) or its refusal rate (``kind: harmless``, the over-refusal sets), both over ALL
answers: the harmful rate is the official attack-success rate, unsafe / all answers, an unparseable verdict
counting as not unsafe (ShaPO md_asr.py:138, nvidia_asr.py:236; HarmBench's mean of label == 1).
``harmful_rate_parseable`` (unsafe / parseable answers) is kept beside it. ``metric_label`` names what a
rate measures: with the refusal-marker judge the harmful rate is a no-refusal rate (refusal, not harm).
Several sampled answers of one prompt (``evaluation.samples``) count as repeated
draws of that prompt: its outcome is their mean (``per_prompt``). Writes, under ``--tables``:

- ``harmful_rate.csv``/``.md``: the main table (primary judge): per method x noise x benchmark the mean and
  std over seeds, a CI (``--ci-level``) by bootstrap over prompts and seeds, the harmful rate (and unsafe / parseable
  answers beside it) and the refusal rate;
- ``rates_by_judge.csv``: the same for every judge;
- ``comparisons.csv``/``.md``: each method against the reference method at the same noise rate, paired on
  the same prompts and seeds: the rate difference with a paired-bootstrap CI and p-value pooled over seeds,
  Holm-adjusted over all comparisons of a judge, McNemar per seed (only with one answer per prompt);
  ``mcnemar_by_seed.csv`` the per-seed tests;
- ``categories.csv``: per-category rates (primary judge), mean over seeds.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from workflow.lib.config import schema_default
from workflow.lib.display import (
    comparisons_display,
    main_table_markdown,
    markdown,
    preference_comparisons_display,
    preference_display,
)
from workflow.lib.files import atomic_path, write_text
from workflow.lib.results import load_judgements, load_preference_scores
from workflow.lib.tables import category_table, comparisons, preference_comparisons, preference_table, rate_table


def write_csv(frame: pd.DataFrame, path) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--judgements", nargs="+", required=True, help="judgement .jsonl files (summary .json beside each)")
    p.add_argument("--primary-judge", required=True, help="judge of the main table")
    p.add_argument("--reference-method", required=True, help="method every other method is compared with")
    # defaults: config report.* (the schema)
    p.add_argument("--n-bootstrap", type=int, default=schema_default("report/n_bootstrap"))
    p.add_argument("--ci-level", type=float, default=schema_default("report/ci_level"))
    p.add_argument("--alpha", type=float, default=schema_default("report/alpha"),
                   help="significance level after Holm's correction")
    p.add_argument("--identical-tolerance", type=float, default=schema_default("report/identical_tolerance"),
                   help="a difference whose value and CI lie within this of 0 is numerically identical, never significant")
    p.add_argument("--seed", type=int, default=schema_default("report/seed"), help="seed of every bootstrap")
    p.add_argument("--tables", required=True, help="output folder of the tables")
    p.add_argument("--preference-scores", nargs="*", default=[],
                   help="held-out preference scores (workflow.score_preferences .jsonl), one file per model")
    a = p.parse_args(argv)

    data = load_judgements(a.judgements)
    if a.primary_judge not in set(data["judge"]):
        raise SystemExit(f"--primary-judge {a.primary_judge!r}: no judgements by it (judges: {sorted(set(data.judge))})")
    out = Path(a.tables)
    rates = rate_table(data, a.n_bootstrap, a.ci_level, a.seed)
    main_rates = rates[rates["judge"] == a.primary_judge].drop(columns="judge")
    pooled, by_seed = comparisons(data, a.reference_method, a.n_bootstrap, a.ci_level, a.seed, a.alpha,
                                  a.identical_tolerance)
    prefs = pref_comp = None
    if a.preference_scores:
        scores = load_preference_scores(a.preference_scores)
        prefs = preference_table(scores, a.n_bootstrap, a.ci_level, a.seed)
        pref_comp = preference_comparisons(scores, a.reference_method, a.n_bootstrap, a.ci_level, a.seed, a.alpha,
                                           a.identical_tolerance)
        write_csv(prefs, out / "preference_accuracy.csv")
        write_text(out / "preference_accuracy.md", markdown(preference_display(prefs, a.ci_level)))
        write_csv(pref_comp, out / "preference_comparisons.csv")
        write_text(out / "preference_comparisons.md", markdown(preference_comparisons_display(pref_comp, a.ci_level)))
        print(markdown(preference_display(prefs, a.ci_level)))
        print(markdown(preference_comparisons_display(pref_comp, a.ci_level)))
    write_csv(main_rates, out / "harmful_rate.csv")
    write_text(out / "harmful_rate.md", main_table_markdown(main_rates, a.ci_level, prefs))
    write_csv(rates, out / "rates_by_judge.csv")
    write_csv(pooled, out / "comparisons.csv")
    shown = comparisons_display(pooled[pooled["judge"] == a.primary_judge], a.ci_level)
    write_text(out / "comparisons.md", markdown(shown))
    write_csv(by_seed, out / "mcnemar_by_seed.csv")
    write_csv(category_table(data[data["judge"] == a.primary_judge]).drop(columns="judge"), out / "categories.csv")
    print(main_table_markdown(main_rates, a.ci_level))
    print(markdown(shown))


if __name__ == "__main__":
    main()
