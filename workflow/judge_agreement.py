"""Pairwise agreement and Cohen's kappa between judges, per benchmark (and over all benchmarks).

    python -m workflow.judge_agreement --labels results/judgements/*/*/*.jsonl ... \
        --output results/tables/judge_agreement.csv

Answers are paired by (model, benchmark, id, sample): the same answer labelled by two judges. Only
answers both judges labelled safe or unsafe are compared; the pairs left out because either
verdict is unparseable are counted (``n_unparseable``). Kappa is sklearn's
``cohen_kappa_score``; it is undefined (NaN) when both judges give one label only.
"""
from __future__ import annotations

import argparse
import itertools
import json

import pandas as pd

from workflow.lib.files import atomic_path
from workflow.lib.results import load_judgements

COLUMNS = ["benchmark", "judge_a", "judge_b", "n", "n_unparseable", "agreement", "kappa",
           "unsafe_rate_a", "unsafe_rate_b"]


def agreement_row(a: pd.Series, b: pd.Series) -> dict:
    """Agreement of two aligned label series (safe/unsafe/unparseable)."""
    import warnings

    from sklearn.metrics import cohen_kappa_score

    both = (a != "unparseable") & (b != "unparseable")
    a, b, n = a[both], b[both], int(both.sum())
    if n == 0:
        return {"n": 0, "n_unparseable": int((~both).sum()), "agreement": float("nan"), "kappa": float("nan"),
                "unsafe_rate_a": float("nan"), "unsafe_rate_b": float("nan")}
    if len(set(a) | set(b)) < 2:
        kappa = float("nan")  # one label only: chance agreement is 1, kappa undefined
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            kappa = float(cohen_kappa_score(a, b, labels=["safe", "unsafe"]))
    return {"n": n, "n_unparseable": int((~both).sum()), "agreement": float((a.values == b.values).mean()),
            "kappa": kappa, "unsafe_rate_a": float((a == "unsafe").mean()), "unsafe_rate_b": float((b == "unsafe").mean())}


def agreement_table(labels: pd.DataFrame) -> pd.DataFrame:
    """labels: columns judge, model, benchmark, id, label. One row per benchmark (+ "all") and judge pair."""
    if "sample" not in labels:
        labels = labels.assign(sample=0)
    wide = labels.pivot_table(index=["model", "benchmark", "id", "sample"], columns="judge", values="label",
                              aggfunc="first")
    judges = sorted(labels.judge.unique())
    rows = []
    for bench in [*sorted(labels.benchmark.unique()), "all"]:
        part = wide if bench == "all" else wide.xs(bench, level="benchmark", drop_level=False)
        for ja, jb in itertools.combinations(judges, 2):
            pair = part[[ja, jb]].dropna()
            rows.append({"benchmark": bench, "judge_a": ja, "judge_b": jb, **agreement_row(pair[ja], pair[jb])})
    return pd.DataFrame(rows, columns=COLUMNS)


def read_labels(paths: list[str]) -> pd.DataFrame:
    """Label files (each with its summary beside it) as one frame: judge, model, benchmark, id, sample, label. The
    model is named by the summary's tags (method, noise, seed), as in the report's tables."""
    data = load_judgements(paths)
    # each tag as text one by one: the start model has no noise or seed (NaN, <NA>), and a nullable column's
    # <NA> would turn a whole concatenated key into NaN, dropping the model from the pivot
    model = [f"{m}/{n}/{s}" for m, n, s in zip(data["method"], data["noise"], data["seed"])]
    return data.assign(model=model)[["judge", "model", "benchmark", "id", "sample", "label"]]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", nargs="+", required=True, help="results/judgements/{judge}/{model}/{benchmark}.jsonl files")
    p.add_argument("--output", required=True)
    a = p.parse_args(argv)
    labels = read_labels(a.labels)
    if labels.judge.nunique() < 2:
        raise SystemExit(f"judge agreement needs two judges or more; got {sorted(labels.judge.unique())}")
    table = agreement_table(labels)
    with atomic_path(a.output) as tmp:
        table.to_csv(tmp, index=False)
    print(json.dumps(table.to_dict(orient="records"), default=str))


if __name__ == "__main__":
    main()
