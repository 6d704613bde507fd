"""Collect judge summaries into the harmful-rate table and the harmful-rate-vs-noise figure.

    python -m workflow.report --summaries results/judgements/*/*.json ... \
        --csv results/tables/harmful_rate.csv --markdown results/tables/harmful_rate.md \
        --figure results/figures/harmful_rate_vs_noise.png

Rows: method × noise rate × benchmark (mean and standard deviation over seeds), plus the
untrained base model as the reference row (method ``base``, no noise rate).
"""
from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from workflow.files import atomic_path, read_json, write_text  # noqa: E402


def harmful_rate_table(summaries: list[dict]) -> pd.DataFrame:
    """One row per (method, noise, benchmark): mean/std harmful rate over seeds, seeds and prompts."""
    frame = pd.DataFrame(summaries)
    frame["noise"] = pd.to_numeric(frame["noise"], errors="coerce")
    table = (frame.groupby(["method", "noise", "benchmark"], dropna=False)
             .agg(harmful_rate=("harmful_rate", "mean"), std=("harmful_rate", "std"),
                  seeds=("harmful_rate", "size"), prompts=("n", "first"))
             .reset_index())
    table["std"] = table["std"].fillna(0.0)
    base_first = table["method"].ne("base")
    return table.assign(_order=base_first).sort_values(["_order", "method", "noise", "benchmark"]).drop(columns="_order")


def markdown_table(table: pd.DataFrame) -> str:
    """Benchmarks as columns, ``rate ± std`` cells (std shown only with several seeds)."""
    cell = table.apply(lambda r: f"{r.harmful_rate:.3f}" + (f" ± {r['std']:.3f}" if r.seeds > 1 else ""), axis=1)
    wide = (table.assign(cell=cell, noise=table["noise"].map(lambda x: "—" if pd.isna(x) else f"{x:.2f}"))
            .pivot_table(index=["method", "noise"], columns="benchmark", values="cell", aggfunc="first", sort=False)
            .reset_index())
    header = "| " + " | ".join(wide.columns) + " |"
    rule = "|" + "---|" * len(wide.columns)
    rows = ["| " + " | ".join(str(v) for v in row) + " |" for row in wide.itertuples(index=False)]
    seeds = int(table.loc[table.method.ne("base"), "seeds"].max()) if table.method.ne("base").any() else 1
    return "\n".join([f"Harmful rate (fraction of answers judged unsafe; {seeds} seed(s) per trained cell)", "",
                      header, rule, *rows]) + "\n"


def plot_harmful_rate(table: pd.DataFrame, path) -> None:
    benchmarks = sorted(table.benchmark.unique())
    fig, axes = plt.subplots(1, len(benchmarks), figsize=(4.5 * len(benchmarks), 3.6), squeeze=False, sharey=True)
    methods = sorted(table.loc[table.method != "base", "method"].unique())
    noises = table.noise.dropna()
    # methods with equal rates would hide each other: offset each a little along x, own marker and dash
    step = 0.012 * ((noises.max() - noises.min()) or 1.0)
    for ax, bench in zip(axes[0], benchmarks):
        sub = table[table.benchmark == bench]
        for i, method in enumerate(methods):
            rows = sub[sub.method == method].sort_values("noise")
            ax.errorbar(rows.noise + (i - (len(methods) - 1) / 2) * step, rows.harmful_rate, yerr=rows["std"],
                        marker="osD^v<>"[i % 7], linestyle=["-", "--", "-.", ":"][i % 4], capsize=3, label=method)
        base = sub[sub.method == "base"]
        if len(base):
            ax.axhline(base.harmful_rate.iloc[0], color="grey", linestyle="--", label="base (untrained)")
        ax.set_title(bench)
        ax.set_xlabel("noise rate ε")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("harmful rate")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--summaries", nargs="+", required=True, help="judge summary JSON files")
    p.add_argument("--csv", required=True)
    p.add_argument("--markdown", required=True)
    p.add_argument("--figure", required=True)
    a = p.parse_args(argv)

    table = harmful_rate_table([read_json(s) for s in a.summaries])
    with atomic_path(a.csv) as tmp:
        table.to_csv(tmp, index=False)
    write_text(a.markdown, markdown_table(table))
    plot_harmful_rate(table, a.figure)
    print(markdown_table(table))


if __name__ == "__main__":
    main()
