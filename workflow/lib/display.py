"""The tables as a reader sees them: markdown, cells with CIs, the comparisons and preference tables as shown in
``results/report.{md,html}`` and ``results/tables/*.md``."""
from __future__ import annotations

import math

import pandas as pd

from workflow.lib.captions import level_text
from workflow.lib.results import PARSEABLE_LABEL, RULE_BASED
from workflow.lib.tables import PREFERENCE_METRICS


def fmt_noise(x) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) or pd.isna(x) else f"{x:.2f}"

def fmt_signed(x: float, digits: int = 3) -> str:
    """A difference with the digits it needs: ``digits`` decimals, or two significant digits when that would
    print a non-zero value as ±0.000 (a rounding-sized difference must not read as an exact 0)."""
    if x is None or pd.isna(x):
        return "n/a"
    if x != 0 and abs(x) < 0.5 * 10 ** -digits:
        return f"{x:+.1e}"
    return f"{x:+.{digits}f}"

def diff_ci(diff: float, lo: float, hi: float) -> str:
    """``+0.133 [+0.047, +0.219]``: a paired difference and its CI, each with the digits it needs."""
    return f"{fmt_signed(diff)} [{fmt_signed(lo)}, {fmt_signed(hi)}]"

IDENTICAL = "numerically identical"

def sig_cell(mark: str, identical: bool) -> str:
    """The "sig." cell: the stars, or "numerically identical" (never starred: config report.identical_tolerance)."""
    return IDENTICAL if identical else mark

def markdown(frame: pd.DataFrame) -> str:
    """A plain GitHub-markdown table (no tabulate dependency)."""
    cols = [str(c) for c in frame.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"

def main_table_wide(table: pd.DataFrame) -> pd.DataFrame:
    """Benchmarks as columns ``benchmark: what the rate measures``, cells ``rate ± std [CI]`` (std only with
    several seeds). A harmful benchmark judged by an LLM judge gets a second column beside it, unsafe /
    parseable answers (mean over seeds); the refusal markers never give an unparseable verdict."""
    def cell(r):
        text = f"{r.rate:.3f}" + (f" ± {r['std']:.3f}" if r.seeds > 1 else "")
        return text + ("" if math.isnan(r.ci_low) else f" [{r.ci_low:.2f}, {r.ci_high:.2f}]")
    label = table.apply(lambda r: f"{r.benchmark}: {r.metric_label}", axis=1)
    main = table.assign(cell=table.apply(cell, axis=1), column=label)
    second = table[(table.kind == "harmful") & (table.judge_type != RULE_BASED)]
    second = second.assign(cell=second["harmful_rate_parseable"].map(lambda x: f"{x:.3f}"),
                           column=second.benchmark + f": {PARSEABLE_LABEL}")
    both = pd.concat([main, second]).sort_index(kind="stable")  # each benchmark's second column after its first
    return (both.assign(noise=both["noise"].map(fmt_noise))
            .pivot_table(index=["method", "noise"], columns="column", values="cell", aggfunc="first", sort=False)
            .reset_index().rename_axis(columns=None))

def rates_sentence(table: pd.DataFrame) -> str:
    """The sentence above the main table: which rate is which."""
    kinds = set(table.get("judge_type", pd.Series(dtype=object)).dropna())
    text = ("Rates are over all answers. Harmful benchmarks: the attack success rate, unsafe / all answers, as "
            "ShaPO and HarmBench report it (an unparseable judge output counts as not unsafe)")
    text += (f"; the column '{PARSEABLE_LABEL}' beside it leaves unparseable outputs out of the denominator"
             if kinds - {RULE_BASED} else "")
    if RULE_BASED in kinds:
        text += ("; with the refusal-marker judge 'unsafe' only means that no refusal phrase was found, so its "
                 "rate is a no-refusal rate: it measures refusal, not harm")
    return text + ". Over-refusal benchmarks: the share of answers with a refusal phrase (refusal markers)."

def main_table_markdown(table: pd.DataFrame, level: float, preferences: pd.DataFrame | None = None) -> str:
    seeds = int(table.loc[table.method.ne("base"), "seeds"].max()) if table.method.ne("base").any() else 1
    pref = ("" if preferences is None else f" The last two columns: held-out preference accuracy and mean "
            f"implicit reward margin on the clean held-out pairs [{level_text(level)} CI over pairs and seeds].")
    return (f"{rates_sentence(table)} Mean ± std over {seeds} seed(s) per trained cell, [{level_text(level)} "
            f"bootstrap CI over prompts and seeds].{pref}\n\n"
            + markdown(main_table_with_preferences(main_table_wide(table), preferences, level)))

def _identical(table: pd.DataFrame) -> list[bool]:
    # tables written before the column existed: nothing was judged identical
    return [bool(x) for x in table["identical"]] if "identical" in table else [False] * len(table)

def comparisons_display(table: pd.DataFrame, level: float) -> pd.DataFrame:
    """The comparisons table as shown in the report."""
    ci = f"diff [{level_text(level)} CI]"
    if table.empty:
        return pd.DataFrame(columns=["method", "vs", "noise", "benchmark", "metric", "rate", ci, "p",
                                     "p (Holm)", "McNemar p (min over seeds)", "sig."])
    return pd.DataFrame({
        "method": table["method"], "vs": table["reference"], "noise": table["noise"].map(fmt_noise),
        "benchmark": table["benchmark"], "metric": table["metric_label"],
        "rate": [f"{a:.3f} → {b:.3f}" for a, b in zip(table["rate_reference"], table["rate_method"])],
        ci: [diff_ci(d, lo, hi) for d, lo, hi in zip(table["diff"], table["ci_low"], table["ci_high"])],
        "p": table["p_bootstrap"].map(lambda p: f"{p:.3g}"), "p (Holm)": table["p_holm"].map(lambda p: f"{p:.3g}"),
        "McNemar p (min over seeds)": table["mcnemar_p_min"].map(lambda p: f"{p:.3g}"),
        "sig.": [sig_cell(m, i) for m, i in zip(table["mark"], _identical(table))],
    })

PREFERENCE_LABEL = {"accuracy": "held-out preference accuracy", "mean_margin": "held-out mean margin"}

def _value_ci(value, lo, hi, digits: int = 3) -> str:
    return f"{value:.{digits}f}" + ("" if pd.isna(lo) else f" [{lo:.{digits}f}, {hi:.{digits}f}]")

def preference_display(table: pd.DataFrame, level: float) -> pd.DataFrame:
    """The preference table as shown: accuracy and mean margin with CIs (± std over seeds with several)."""
    def cell(r, metric):
        std = f" ± {r[f'{metric}_std']:.3f}" if r.seeds > 1 else ""
        return _value_ci(r[metric], r[f"{metric}_ci_low"], r[f"{metric}_ci_high"]).replace(" [", std + " [", 1)
    return pd.DataFrame({"method": table.method, "noise": table.noise.map(fmt_noise),
                         **{f"{PREFERENCE_LABEL[m]} [{level_text(level)} CI]": [cell(r, m) for _, r in table.iterrows()]
                            for m in PREFERENCE_METRICS},
                         "pairs": table.pairs, "seeds": table.seeds})

def main_table_with_preferences(wide: pd.DataFrame, preferences: pd.DataFrame | None, level: float) -> pd.DataFrame:
    """The main table (``main_table_wide``) with the held-out preference accuracy and mean margin beside the
    rates, matched on method and noise rate."""
    if preferences is None or preferences.empty:
        return wide
    shown = preference_display(preferences, level).drop(columns=["pairs", "seeds"])
    return wide.merge(shown, on=["method", "noise"], how="outer", sort=False)

def preference_comparisons_display(table: pd.DataFrame, level: float) -> pd.DataFrame:
    """The preference comparisons as shown in the report."""
    ci = f"diff [{level_text(level)} CI]"
    if table.empty:
        return pd.DataFrame(columns=["comparison", "model", "vs", "metric", "value", ci, "p", "p (Holm)",
                                     "MDD (80% power)", "sig."])
    def name(m, n):
        return m if n is None or pd.isna(n) else f"{m} ε={n:g}"
    return pd.DataFrame({
        "comparison": table.comparison, "model": [name(m, n) for m, n in zip(table.method, table.noise)],
        "vs": [name(m, n) for m, n in zip(table.vs_method, table.vs_noise)], "metric": table.metric.map(PREFERENCE_LABEL),
        "value": [f"{a:.3f} → {b:.3f}" for a, b in zip(table.value_vs, table.value)],
        ci: [diff_ci(d, lo, hi) for d, lo, hi in zip(table["diff"], table.ci_low, table.ci_high)],
        "p": table.p_bootstrap.map(lambda p: f"{p:.3g}"),
        "p (Holm)": table.p_holm.map(lambda p: "" if pd.isna(p) else f"{p:.3g}"),
        "MDD (80% power)": table.mdd80.map(lambda x: "—" if pd.isna(x) else f"{x:.3g}"),
        "sig.": [sig_cell(m if k == "method" else ("CI excludes 0" if s else ""), i) for k, m, s, i in
                 zip(table.comparison, table["mark"], table.significant, _identical(table))],
    })


def perturbation_display(table: pd.DataFrame) -> pd.DataFrame:
    """The perturbation summary (workflow.perturbation) as shown in the report and perturbation.md (numbers to 3 significant digits, no sentences)."""
    # the cosine itself reads "1" at 3 digits whatever it is: 1 − cos carries it
    shown = table.drop(columns=["statement", "grad_cosine"]).astype(object)
    for col in ["move_norm", "move_relative", "effective_fraction", "effective_fraction_max", "cosine_gap",
                "grad_norm_change", "delta_loss", "delta_loss_abs_max"]:
        shown[col] = table[col].map(lambda v: "" if pd.isna(v) else f"{v:.3g}")
    return shown.rename(columns={"cosine_gap": "1 − cos", "delta_loss": "ΔL", "delta_loss_abs_max": "max abs ΔL"})
