"""The cost projection (workflow/plan.py) against a finished run's measured per-rule times.

    python bench/cost_vs_measured.py [RUN] [--configfile F ...] [--time wall|cpu] [--min-cores C] [--out FILE]

RUN is the run's working directory (default: here). Its jobs are read from Snakemake's DAG with every job
forced (its own Snakefile and config.yaml: the jobs it ran) and projected on this machine's figures
(``--gpu cpu-2core``: docs/cost.md); the measured times are its ``results/benchmarks/`` records (as
bench/rule_times.py reads them), job by job. Prints per rule the jobs, projected and measured seconds and their
ratio, and exits 1 when a ratio is outside [1/2, 2].

``--time wall`` (default) compares wall seconds: the right measure on an idle machine, where a job's wall
time is what it costs. ``--time cpu`` compares CPU seconds (projected: start-up, loading and writes on one
thread, compute on each of the job's threads): on a machine other processes load, a job's wall time grows
with the load, its CPU time much less (docs/cost.md says by how much); jobs that load no model are compared on
wall time either way (the benchmark's CPU sampling misses most of a sub-second process). The fastest training step of each
policy (its train log's ``seconds``) is compared with the projected step as well: of all the figures, the
least touched by other processes. ``cores`` (CPU ÷ wall seconds of a rule's jobs) shows how much of the
machine the jobs had: near their threads on an idle machine, far below when other processes took the cores;
``--min-cores`` compares only the model-loading jobs that had at least that many.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workflow.lib.cost import DEVICES, Model, assumptions_for, cpu_seconds, job_cost, parse_overrides  # noqa: E402
from workflow.lib.dag import dag_jobs  # noqa: E402

LOW, HIGH = 0.5, 2.0


def measured_record(path: Path) -> dict | None:
    """Wall and CPU seconds of one Snakemake benchmark record (its last line), None when it does not exist."""
    if not path.exists():
        return None
    record = pd.read_csv(path, sep="\t").iloc[-1]
    return {"wall": float(record["s"]), "cpu": float(record["cpu_time"])}


def comparison(run: Path, time: str, overrides: dict, min_cores: float = 0.0,
               configfiles: list[str] = ()) -> tuple[pd.DataFrame, Model, list[dict]]:
    """Per rule, over the jobs that have a benchmark record: jobs, projected and measured seconds (wall or CPU)
    and projected / measured. Matching job by job, a run still going is compared on what it has done.
    ``min_cores``: leave out model-loading jobs that had fewer cores on average (CPU ÷ wall seconds)."""
    device = DEVICES["cpu-2core"]
    dag = dag_jobs(run / "Snakefile", run, [Path(f).resolve() for f in configfiles], forceall=True)
    m = Model(dag["config"], device, assumptions_for(device, overrides), {}, run)
    rows = []
    for job in dag["jobs"]:
        record = measured_record(run / job["benchmark"]) if job["benchmark"] else None
        cost = job_cost(m, job)
        if record is None or cost is None:
            continue
        # a job that only starts a process: under a second or two, which Snakemake's once-a-second CPU sampling
        # mostly misses (sample_benchmark: 0.00 CPU s in 0.3 s), so compared on wall time either way
        wall = time == "wall" or cost.load == cost.compute == cost.write == 0
        if not (cost.load == cost.compute == cost.write == 0) and record["cpu"] < min_cores * record["wall"]:
            continue
        rows.append({"rule": job["rule"], "measured_s": record["wall" if wall else "cpu"],
                     "projected_s": cost.seconds if wall else cpu_seconds(m, cost, job["threads"]),
                     "wall": record["wall"], "cpu": record["cpu"]})
    if not rows:
        raise SystemExit(f"{run}: no benchmark records of its jobs (run the workflow first)")
    table = pd.DataFrame(rows).groupby("rule").agg(jobs=("rule", "size"), projected_s=("projected_s", "sum"),
                                                   measured_s=("measured_s", "sum"), wall=("wall", "sum"),
                                                   cpu=("cpu", "sum")).reset_index()
    table["ratio"] = table.projected_s / table.measured_s
    # cores the jobs had on average (CPU s / wall s): near their threads on an idle machine, far below under load
    table["cores"] = table.cpu / table.wall
    table = table.drop(columns=["wall", "cpu"])
    return table.sort_values("measured_s", ascending=False).reset_index(drop=True), m, dag["jobs"]


def fastest_steps(run: Path, m: Model, jobs: list[dict]) -> pd.DataFrame:
    """Per policy: the projected seconds of one plain training step and the fastest measured step."""
    t = m.config["training"]
    step = m.training(m.n(m.base), t["batch_size"] * 2 * m.seq_tokens(), 1, t_threads(jobs))
    out = []
    for log in sorted((run / "results/policies").rglob("*.train_log.tsv")):
        frame = pd.read_csv(log, sep="\t")
        plain = frame[~frame.sharpness_step.astype(bool)]
        out.append({"policy": str(log.relative_to(run / "results/policies")).removesuffix(".train_log.tsv"),
                    "projected_step_s": step, "fastest_step_s": plain.seconds.min(),
                    "ratio": step / plain.seconds.min()})
    return pd.DataFrame(out)


def t_threads(jobs: list[dict]) -> int:
    return max((j["threads"] for j in jobs if j["rule"] == "train_policy"), default=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", nargs="?", default=".", help="the finished run's working directory")
    p.add_argument("--time", choices=["wall", "cpu"], default="wall")
    p.add_argument("--configfile", nargs="*", default=[], help="the config files the run was given besides its config.yaml")
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="override an assumption")
    p.add_argument("--min-cores", type=float, default=0.0,
                   help="compare only the model-loading jobs that had at least this many cores on average (a loaded machine)")
    p.add_argument("--out", default="results/bench/cost_vs_measured.tsv")
    a = p.parse_args(argv)
    run = Path(a.run).resolve()
    table, m, jobs = comparison(run, a.time, parse_overrides(a.set), a.min_cores, a.configfile)
    kept = f", model-loading jobs with {a.min_cores:g} cores or more" if a.min_cores else ""
    print(f"{run}: projected on {m.device.name} vs measured, {a.time} seconds per rule{kept}")
    print(table.round(2).to_string(index=False))
    total_p, total_m = table.projected_s.sum(), table.measured_s.sum()
    print(f"total: projected {total_p:.0f} s, measured {total_m:.0f} s, ratio {total_p / total_m:.2f}")
    steps = fastest_steps(run, m, jobs)
    if len(steps):
        print("\none training step (no sharpness), projected vs the fastest measured step of each policy:")
        print(steps.round(2).to_string(index=False))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(out, sep="\t", index=False)
    outside = table[(table.ratio < LOW) | (table.ratio > HIGH) | table.ratio.isna()]
    if len(outside):
        print(f"\noutside [{LOW}, {HIGH}]: {', '.join(outside.rule)}")
        raise SystemExit(1)
    print(f"\nevery rule within [{LOW}, {HIGH}]")


if __name__ == "__main__":
    main()
