"""Project a run's cost before submitting it: per rule the jobs, GPUs per job, hours, GPU-hours on the named
device, the share spent starting processes and loading models and the share spent writing weights and
checkpoints; then the totals and the Slurm submissions.

    python -m workflow.plan --configfile config/paper.yaml --gpu h100-80gb
    python -m workflow.plan --configfile config/paper.yaml --gpu a100-80gb --set mfu_train=0.3 --markdown
    python -m workflow.plan --gpu cpu-2core --forceall        # the default run on this machine's figures

The jobs are Snakemake's own (the same Snakefile, config and needrun logic as ``snakemake -n``; with
``--forceall`` every job of the run), read by ``workflow/lib/dag.py``; the cost model and every assumption it
makes are in ``workflow/lib/cost.py`` and docs/cost.md. ``--set NAME=VALUE`` overrides an assumption
(``--set benchmark_sizes.saladbench=5000`` an entry of a table, ``--set device.bandwidth=2e12`` a figure of the
device), ``--params MODEL=N`` a parameter count.
Not a stage: no rule runs it (tests/test_layout.py lists it as a command).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from workflow.lib.cost import (DEVICES, Model, assumptions_for, device_with, group_submissions, parse_overrides,
                               project)
from workflow.lib.dag import dag_jobs

ROOT = Path(__file__).resolve().parent.parent


def gpus_text(gpus: set) -> str:
    return "/".join(str(g) for g in sorted(gpus))


def shape_text(row) -> str:
    parts = [f"{row.submitted} jobs" if row.submitted else "", f"{row.local} local" if row.local else "",
             f"{row.grouped} grouped" if row.grouped else ""]
    return ", ".join(p for p in parts if p)


def table(rows, totals, groups: dict[str, int], markdown: bool = False) -> str:
    """The projection as text (aligned columns) or a Markdown table."""
    head = ["rule", "jobs", "GPUs/job", "hours", "GPU-hours", "loading", "writing", "submitted as"]
    body = [[r.rule, str(r.jobs), gpus_text(r.gpus), f"{r.seconds / 3600:.2f}", f"{r.gpu_seconds / 3600:.1f}",
             f"{r.loading / max(r.seconds, 1e-9):.0%}", f"{r.writing / max(r.seconds, 1e-9):.0%}", shape_text(r)]
            for r in rows]
    body.append(["total", str(totals["jobs"]), "", f"{totals['hours']:.1f}", f"{totals['gpu_hours']:.1f}",
                 f"{totals['loading_share']:.0%}", "", f"{totals['submissions']} submissions"])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in body]
    else:
        widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
        lines = ["  ".join(x.ljust(w) if i in (0, 7) else x.rjust(w) for i, (x, w) in enumerate(zip(row, widths)))
                 for row in [head, *body]]
    groups_text = ", ".join(f"{name}: {n}" for name, n in groups.items()) or "none"
    lines.append("")
    lines.append(f"Slurm submissions: {totals['submissions']} ({totals['jobs']} jobs: {totals['local']} run "
                 f"locally, {sum(r.grouped for r in rows)} in {totals['groups']} group jobs; groups {groups_text})")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configfile", nargs="*", default=[], help="config files merged onto config.yaml, as for snakemake")
    p.add_argument("--gpu", default="h100-80gb", choices=sorted(DEVICES), help="the device the run is projected on")
    p.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="override an assumption (docs/cost.md)")
    p.add_argument("--params", nargs="*", default=[], metavar="MODEL=N", help="parameter count of a model")
    p.add_argument("--snakefile", default=str(ROOT / "Snakefile"), help="another checkout's Snakefile (its job shape)")
    p.add_argument("--directory", default=".", help="the run's working directory (what is done there is not projected)")
    p.add_argument("--forceall", action="store_true", help="project every job, done or not")
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--json", help="also write the rows and totals to this file")
    a = p.parse_args(argv)

    device = device_with(DEVICES[a.gpu], [s for s in a.set if s.startswith("device.")])
    assumptions = assumptions_for(device, parse_overrides([s for s in a.set if not s.startswith("device.")]))
    params = {}
    for pair in a.params:
        name, sep, value = pair.rpartition("=")
        if not sep or not value.isdigit():
            raise SystemExit(f"--params {pair!r}: expected MODEL=N (N an integer)")
        params[name] = int(value)
    dag = dag_jobs(a.snakefile, a.directory, [Path(f).absolute() for f in a.configfile], a.forceall)
    model = Model(dag["config"], device, assumptions, params, Path(a.directory))
    rows, totals = project(model, dag["jobs"])
    print(f"{dag['config']['model']['name_or_path']} on {device.name} ({device.note}); {len(dag['jobs'])} jobs to run")
    print(table(rows, totals, group_submissions(dag["jobs"]), a.markdown))
    if a.json:
        out = {"device": device.name, "model": dag["config"]["model"]["name_or_path"], "totals": totals,
               "rules": [{**{k: v for k, v in vars(r).items() if k != "gpus"}, "gpus": sorted(r.gpus)} for r in rows]}
        Path(a.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
