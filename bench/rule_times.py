"""Summarise the Snakemake ``benchmark:`` records of a run: wall and CPU seconds and peak RSS per rule.

    python bench/rule_times.py [results/benchmarks] [--out results/bench/rule_times.tsv]

Prints one row per rule (jobs, total and mean wall seconds, total and mean CPU seconds, max peak RSS in MB) and
the totals, and saves the table. Rules run one after another on 2 cores in the default run, so the wall total is
close to the pipeline's wall time (job start-up and scheduling are not included). On a shared machine a job's wall
time follows the load; its CPU time (``cpu_time``, the job's processes as Snakemake samples them) much less.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd


def rule_times(folder: Path) -> pd.DataFrame:
    rows = []
    for tsv in sorted(folder.rglob("*.tsv")):
        record = pd.read_csv(tsv, sep="\t").iloc[-1]
        rule = tsv.relative_to(folder).parts[0].removesuffix(".tsv")
        rows.append({"rule": rule, "s": float(record["s"]), "cpu_s": float(record["cpu_time"]),
                     "max_rss_mb": float(record["max_rss"])})
    if not rows:
        raise SystemExit(f"{folder}: no benchmark records (run the workflow first)")
    frame = pd.DataFrame(rows)
    table = frame.groupby("rule").agg(jobs=("s", "size"), total_s=("s", "sum"), mean_s=("s", "mean"),
                                      total_cpu_s=("cpu_s", "sum"), mean_cpu_s=("cpu_s", "mean"),
                                      peak_rss_mb=("max_rss_mb", "max")).sort_values("total_s", ascending=False)
    return table.reset_index()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", default="results/benchmarks")
    p.add_argument("--out", default="results/bench/rule_times.tsv")
    a = p.parse_args(argv)
    table = rule_times(Path(a.folder))
    print(table.round(1).to_string(index=False))
    print(f"total: {table.total_s.sum():.0f} s ({table.total_s.sum() / 60:.1f} min) wall, {table.total_cpu_s.sum():.0f}"
          f" CPU s, over {table.jobs.sum()} jobs")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(a.out, sep="\t", index=False)


if __name__ == "__main__":
    main()
