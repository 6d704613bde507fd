"""The report's tables as frames: rates per judge x method x noise x benchmark with bootstrap CIs, paired
comparisons with the reference method, per-category rates, and the held-out preference tables."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from workflow.lib.results import outcome_matrix, per_prompt
from workflow.lib.statistics import (
    bootstrap_ci,
    holm,
    mcnemar_test,
    minimum_detectable_difference,
    numerically_identical,
    paired_bootstrap,
    significance_mark,
)

CELL = ["judge", "method", "noise", "benchmark"]

def _cell_seed(keys, seed) -> int:
    """A bootstrap seed per cell, fixed by the run seed and the cell's name (reproducible, independent)."""
    return int(np.random.SeedSequence([seed, *map(ord, "|".join(map(str, keys)))]).generate_state(1)[0])

def rate_table(data: pd.DataFrame, n_boot: int, level: float, seed: int) -> pd.DataFrame:
    """Per judge x method x noise x benchmark: the benchmark's metric (mean, std over seeds, bootstrap CI), and
    the harmful rate over all and over parseable answers, the unparseable share and the refusal rate (means
    over seeds)."""
    data = per_prompt(data)
    rows = []
    for keys, cell in data.groupby(CELL, dropna=False, sort=False):
        per_seed = cell.groupby("seed", dropna=False)
        rate_by_seed = per_seed["outcome"].mean()
        lo, hi = bootstrap_ci(outcome_matrix(cell), n_boot, level, _cell_seed(keys, seed))
        rows.append(dict(zip(CELL, keys), judge_type=cell["judge_type"].iloc[0], kind=cell["kind"].iloc[0],
                         metric=cell["metric"].iloc[0], metric_label=cell["metric_label"].iloc[0],
                         rate=float(rate_by_seed.mean()),
                         std=float(rate_by_seed.std(ddof=1)) if len(rate_by_seed) > 1 else 0.0,
                         ci_low=lo, ci_high=hi,
                         harmful_rate=float(per_seed["unsafe"].mean().mean()),
                         harmful_rate_parseable=float(per_seed["unsafe_parseable"].mean().mean()),
                         unparseable_rate=float(per_seed["unsafe_parseable"].apply(lambda x: x.isna().mean()).mean()),
                         refusal_rate=float(per_seed["refused"].mean().mean()),
                         seeds=len(rate_by_seed), prompts=int(cell["id"].nunique()),
                         samples=int(cell["samples"].max()),
                         prompt_truncated=int(cell.loc[cell["prompt_truncated"].astype(bool), "id"].nunique())))
    table = pd.DataFrame(rows)
    order = table["method"].ne("base")
    return (table.assign(_o=order).sort_values(["judge", "_o", "method", "noise", "benchmark"])
            .drop(columns="_o").reset_index(drop=True))

def comparisons(data: pd.DataFrame, reference: str, n_boot: int, level: float, seed: int, alpha: float = 0.05,
                tolerance: float = 0.0):
    """Each method vs ``reference`` at the same noise rate and benchmark, per judge.

    Returns (pooled table, McNemar-per-seed table). Holm's correction runs over all pooled comparisons of
    one judge (every method, noise rate and benchmark), separately for the bootstrap and McNemar families.
    A comparison whose difference and CI lie within ``tolerance`` of 0 is ``identical`` and never significant.
    """
    pooled, by_seed = [], []
    data = per_prompt(data)
    trained = data[data["method"].ne("base")]
    for (judge, noise, bench), group in trained.groupby(["judge", "noise", "benchmark"], sort=True):
        ref = group[group["method"] == reference]
        if ref.empty:
            continue
        ids = sorted(ref["id"].unique())
        for method, cell in group[group["method"] != reference].groupby("method", sort=True):
            seeds = sorted(set(ref["seed"].dropna()) & set(cell["seed"].dropna()))
            if not seeds:
                raise ValueError(f"{judge}/{method}/noise{noise}/{bench}: no seed in common with {reference}")
            if set(cell["id"]) != set(ids):
                raise ValueError(f"{judge}/{method}/noise{noise}/{bench}: prompt ids differ from {reference}'s; "
                                 "comparisons must be paired on the same prompts")
            a = outcome_matrix(ref[ref["seed"].isin(seeds)], ids=ids)
            b = outcome_matrix(cell[cell["seed"].isin(seeds)], ids=ids)
            keys = (judge, method, noise, bench)
            boot = paired_bootstrap(a, b, n_boot, level, _cell_seed(keys, seed))
            tests = []
            # McNemar needs one 0/1 outcome per prompt: with several sampled answers per prompt it is not run
            binary = max(ref["samples"].max(), cell["samples"].max()) == 1
            for i, s in enumerate(seeds if binary else []):
                t = mcnemar_test(a[i], b[i])
                tests.append(t)
                by_seed.append(dict(judge=judge, method=method, reference=reference, noise=noise, benchmark=bench,
                                    seed=int(s), **t))
            pooled.append(dict(judge=judge, method=method, reference=reference, noise=noise, benchmark=bench,
                               kind=cell["kind"].iloc[0], metric=cell["metric"].iloc[0],
                               metric_label=cell["metric_label"].iloc[0],
                               rate_reference=float(np.nanmean(a)), rate_method=float(np.nanmean(b)),
                               diff=boot["diff"], ci_low=boot["ci_low"], ci_high=boot["ci_high"],
                               p_bootstrap=boot["p"], se=boot["se"],
                               mdd80=minimum_detectable_difference(boot["se"], alpha), seeds=len(seeds), prompts=len(ids),
                               mcnemar_p_min=min(t["p"] for t in tests) if tests else math.nan,
                               discordant=sum(t["b"] + t["c"] for t in tests) if tests else math.nan))
    cols = ["judge", "method", "reference", "noise", "benchmark", "kind", "metric", "metric_label", "rate_reference",
            "rate_method",
            "diff", "ci_low", "ci_high", "p_bootstrap", "p_holm", "mcnemar_p_min", "mcnemar_p_holm", "identical",
            "significant", "mark", "se", "mdd80", "seeds", "prompts", "discordant"]
    table = pd.DataFrame(pooled)
    seed_table = pd.DataFrame(by_seed, columns=["judge", "method", "reference", "noise", "benchmark", "seed", "b",
                                                "c", "n", "statistic", "p", "exact"])
    if table.empty:
        return pd.DataFrame(columns=cols), seed_table
    table["p_holm"] = np.nan
    table["mcnemar_p_holm"] = np.nan
    seed_table["p_holm"] = np.nan
    for judge, idx in table.groupby("judge").groups.items():
        table.loc[idx, "p_holm"] = holm(table.loc[idx, "p_bootstrap"])
    for judge, idx in seed_table.groupby("judge").groups.items():
        seed_table.loc[idx, "p_holm"] = holm(seed_table.loc[idx, "p"])
    # the smallest Holm-adjusted McNemar p over the seeds of a comparison
    adj = seed_table.groupby(["judge", "method", "noise", "benchmark"])["p_holm"].min()
    table["mcnemar_p_holm"] = [adj.get((r.judge, r.method, r.noise, r.benchmark), np.nan) for r in table.itertuples()]
    _judge(table, table["p_holm"] < alpha, np.ones(len(table), bool), alpha, tolerance)
    return table[cols], seed_table

def _judge(table: pd.DataFrame, significant, marked, alpha: float, tolerance: float) -> None:
    """Columns identical, significant and mark: a numerically identical difference is never significant nor
    starred, whatever its p; ``marked`` rows get stars from their Holm p."""
    table["identical"] = [numerically_identical(d, lo, hi, tolerance)
                          for d, lo, hi in zip(table["diff"], table["ci_low"], table["ci_high"])]
    table["significant"] = np.asarray(significant, bool) & ~table["identical"].to_numpy(bool)
    table["mark"] = [significance_mark(p, alpha) if m and s else ""
                     for p, m, s in zip(table["p_holm"], marked, table["significant"])]

def category_table(data: pd.DataFrame) -> pd.DataFrame:
    """Per method x noise x benchmark x category: the metric, mean over seeds, and the number of prompts."""
    data = per_prompt(data)
    per_seed = (data.groupby([*CELL, "category", "seed"], dropna=False)
                .agg(rate=("outcome", "mean"), prompts=("id", "nunique")).reset_index())
    return (per_seed.groupby([*CELL, "category"], dropna=False)
            .agg(rate=("rate", "mean"), prompts=("prompts", "first"), seeds=("seed", "size")).reset_index())

# Per clean held-out pair (workflow.score_preferences): the implicit reward margin and whether it is positive
# ("correct": 1, 0, and 0.5 for a tie, so an unchanged model scores 0.5). Both are paired across models by
# pair id, so every difference below is paired on the same pairs (and the same seeds).
PREFERENCE_METRICS = {"accuracy": "correct", "mean_margin": "margin"}

def _model_cell(data: pd.DataFrame, method: str, noise) -> pd.DataFrame:
    rows = data[data.method == method]
    return rows[rows.noise.isna()] if noise is None or pd.isna(noise) else rows[np.isclose(rows.noise, noise)]

def preference_table(data: pd.DataFrame, n_boot: int, level: float, seed: int) -> pd.DataFrame:
    """Per method x noise: held-out accuracy and mean margin (mean and std over seeds, bootstrap CI over pairs
    and seeds), the number of pairs and seeds. The base model first."""
    rows = []
    for (method, noise), cell in data.groupby(["method", "noise"], dropna=False, sort=False):
        row = {"method": method, "noise": noise}
        for metric, column in PREFERENCE_METRICS.items():
            by_seed = cell.groupby("seed", dropna=False)[column].mean()
            lo, hi = bootstrap_ci(outcome_matrix(cell, column), n_boot, level,
                                  _cell_seed(("preferences", metric, method, noise), seed))
            row |= {metric: float(by_seed.mean()), f"{metric}_std": float(by_seed.std(ddof=1)) if len(by_seed) > 1
                    else 0.0, f"{metric}_ci_low": lo, f"{metric}_ci_high": hi}
        rows.append(row | {"ties": int((cell.margin == 0).sum()), "pairs": int(cell["id"].nunique()),
                           "seeds": int(cell["seed"].nunique()) if cell["seed"].notna().any() else 1})
    table = pd.DataFrame(rows)
    return (table.assign(_o=table.method.ne("base")).sort_values(["_o", "method", "noise"])
            .drop(columns="_o").reset_index(drop=True))

def _paired_matrices(first: pd.DataFrame, second: pd.DataFrame, column: str, what: str):
    """seeds x pairs matrices of two models on the same pairs and seeds; a model without seeds (the base
    model) is repeated for every seed of the other."""
    ids = sorted(first["id"].unique())
    if set(second["id"]) != set(ids):
        raise ValueError(f"preference comparison {what}: the held-out pair ids differ; rescore both models")
    a, b = outcome_matrix(first, column, ids), outcome_matrix(second, column, ids)
    if first["seed"].notna().any() and second["seed"].notna().any():
        seeds = sorted(set(first["seed"].dropna()) & set(second["seed"].dropna()))
        if not seeds:
            raise ValueError(f"preference comparison {what}: no seed in common")
        a = outcome_matrix(first[first.seed.isin(seeds)], column, ids)
        b = outcome_matrix(second[second.seed.isin(seeds)], column, ids)
    elif len(a) != len(b):
        a, b = (np.repeat(a, len(b), 0), b) if len(a) == 1 else (a, np.repeat(b, len(a), 0))
    return a, b, len(ids)

def preference_comparisons(data: pd.DataFrame, reference: str, n_boot: int, level: float, seed: int,
                           alpha: float = 0.05, tolerance: float = 0.0) -> pd.DataFrame:
    """Paired comparisons on the held-out pairs, for accuracy and mean margin (diff = model − baseline):

    - ``training``: the reference method at the lowest noise rate vs the base model (does training move
      held-out preferences at all?);
    - ``noise``: the reference method at each higher noise rate vs itself at the lowest one (does label
      noise hurt on clean pairs?);
    - ``method``: every other method vs the reference method at the same noise rate.

    Each row: the difference, its paired-bootstrap CI and p (pairs and seeds resampled together), the
    bootstrap SE and the minimum detectable difference at 80 % power (``mdd80``). Holm's correction
    (``p_holm``) runs over the ``method`` rows only (all methods, noise rates and both metrics: one family,
    separate from the harmful-rate comparisons); the two preconditions are single pre-specified tests, reported
    unadjusted. A difference within ``tolerance`` of 0 (CI included) is ``identical``: never significant.
    """
    trained = data[data.method.ne("base")]
    ref_noises = sorted(trained.loc[trained.method == reference, "noise"].dropna().unique())
    plan = []  # (kind, method, noise, baseline method, baseline noise)
    if ref_noises and (data.method == "base").any():
        plan.append(("training", reference, ref_noises[0], "base", None))
    plan += [("noise", reference, n, reference, ref_noises[0]) for n in ref_noises[1:]]
    for noise in ref_noises:
        for method in sorted(set(trained.loc[np.isclose(trained.noise, noise), "method"]) - {reference}):
            plan.append(("method", method, noise, reference, noise))
    rows = []
    for kind, method, noise, base_method, base_noise in plan:
        first, second = _model_cell(data, base_method, base_noise), _model_cell(data, method, noise)
        what = f"{method}@{noise:g} vs {base_method}" + ("" if base_noise is None else f"@{base_noise:g}")
        for metric, column in PREFERENCE_METRICS.items():
            a, b, n_pairs = _paired_matrices(first, second, column, what)
            boot = paired_bootstrap(a, b, n_boot, level, _cell_seed(("pref", kind, metric, method, noise), seed))
            rows.append({"comparison": kind, "method": method, "noise": noise, "vs_method": base_method,
                         "vs_noise": base_noise, "metric": metric, "value_vs": float(np.nanmean(a)),
                         "value": float(np.nanmean(b)), "diff": boot["diff"], "ci_low": boot["ci_low"],
                         "ci_high": boot["ci_high"], "p_bootstrap": boot["p"], "se": boot["se"],
                         "mdd80": minimum_detectable_difference(boot["se"], alpha), "pairs": n_pairs, "seeds": len(a)})
    cols = ["comparison", "method", "noise", "vs_method", "vs_noise", "metric", "value_vs", "value", "diff", "ci_low",
            "ci_high", "p_bootstrap", "p_holm", "identical", "significant", "mark", "se", "mdd80", "pairs", "seeds"]
    table = pd.DataFrame(rows, columns=[c for c in cols if c not in ("p_holm", "identical", "significant", "mark")])
    table["p_holm"] = np.nan
    family = table.comparison == "method"
    if family.any():
        table.loc[family, "p_holm"] = holm(table.loc[family, "p_bootstrap"])
    # the preconditions are judged by their CI (unadjusted); the method family by its Holm-adjusted p
    _judge(table, np.where(family, table.p_holm < alpha, (table.ci_low > 0) | (table.ci_high < 0)), family, alpha,
           tolerance)
    return table[cols]
