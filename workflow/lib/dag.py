"""The jobs Snakemake would run, read from Snakemake's own DAG (the same config, rules and needrun logic as
``snakemake -n``), as plain dicts: rule, wildcards, input, output, threads, resources, benchmark (its record's path), group,
local; and the
config the Snakefile validated (defaults filled in).

    python workflow/lib/dag.py '{"snakefile": "Snakefile", "workdir": ".", "configfiles": ["config/paper.yaml"]}'

prints ``{"config": ..., "jobs": [...]}`` as JSON. ``workflow.plan`` runs it in a subprocess (``dag_jobs``): Snakemake changes the
working directory and installs its own logging, and a Snakefile of another checkout (the job shape before a
change) must import that checkout's ``workflow.lib``, not the one already imported. So this file imports
nothing from ``workflow``.

It uses Snakemake internals (``Workflow._prepare_dag``, ``_build_dag``, ``_executor_plugin``, ``DAG.postprocess``,
``DAG._group``)
as ``snakemake --d3dag`` and ``-n`` do; they are those of the pinned Snakemake (requirements.txt), and tests/test_plan.py reads a
real DAG through them, so an upgrade that moves them fails there first.
"""
from __future__ import annotations

import sys

if __name__ == "__main__":  # run as a script: its own folder (workflow/lib, which has a statistics.py) leaves the path
    sys.path.pop(0)

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

# threads are capped at the cores Snakemake is given; a large number keeps every rule's own threads
CORES = 4096


def read_jobs(snakefile: str, workdir: str, configfiles: list[str], forceall: bool = False) -> dict:
    """The validated config and every job of the DAG that needs to run (all of them with ``forceall``)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import (ConfigSettings, DAGSettings, ExecutionSettings, OutputSettings, Quietness,
                                         ResourceSettings)

    output = OutputSettings(dryrun=True, quiet={Quietness.ALL}, enable_file_logging=False)
    with SnakemakeApi(output) as api:
        workflow_api = api.workflow(resource_settings=ResourceSettings(cores=CORES, nodes=CORES),
                                    config_settings=ConfigSettings(configfiles=[Path(f) for f in configfiles]),
                                    snakefile=Path(snakefile).absolute(), workdir=Path(workdir).absolute())
        workflow_api.dag(DAGSettings(forceall=forceall))
        workflow = workflow_api._workflow
        # the dry-run executor, as `snakemake -n` has: with no executor Snakemake ignores groups (local execution)
        from snakemake_interface_executor_plugins.registry import ExecutorPluginRegistry

        workflow._executor_plugin = ExecutorPluginRegistry().get_plugin("dryrun")
        workflow.execution_settings = ExecutionSettings(lock=False)
        workflow._prepare_dag(forceall=forceall, ignore_incomplete=True, lock_warn_only=True, nolock=True)
        workflow._build_dag()
        dag = workflow.dag
        workflow.async_run(dag.postprocess(update_needrun=False))  # as execute() does: forms the group jobs
        groups = {}  # GroupJob -> a stable label: its group id and its order of appearance
        jobs = []
        for job in dag.needrun_jobs():
            group = dag._group.get(job)
            if group is not None and group not in groups:
                groups[group] = f"{group.groupid}#{sum(g.groupid == group.groupid for g in groups)}"
            resources = {k: v for k, v in job.resources.items() if not k.startswith("_") and k != "tmpdir"}
            jobs.append({"rule": job.rule.name, "wildcards": dict(job.wildcards_dict),
                         "input": [str(f) for f in job.input], "output": [str(f) for f in job.output],
                         "threads": job.threads, "resources": resources,
                         "benchmark": str(job.benchmark) if job.benchmark else None,
                         "group": groups.get(group), "local": group is None and (
                             job.rule.name in workflow._localrules or bool(job.rule.norun))})
        return {"config": json.loads(json.dumps(workflow.config, default=str)), "jobs": jobs}


def dag_jobs(snakefile, workdir, configfiles, forceall: bool = False) -> dict:
    """``read_jobs`` in a fresh Python process (see the module's docstring); a Snakemake error (a bad config)
    comes back as SystemExit with Snakemake's message."""
    args = {"snakefile": str(snakefile), "workdir": str(workdir), "configfiles": [str(f) for f in configfiles],
            "forceall": forceall}
    # SHAPO_PLAN: the config check that vLLM is installed is skipped (workflow/lib/checks.py check_backend)
    proc = subprocess.run([sys.executable, __file__, json.dumps(args)], capture_output=True, text=True,
                          env={**os.environ, "SHAPO_PLAN": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"Snakemake could not build the DAG ({snakefile}, config {configfiles}):\n"
                         + (proc.stderr.strip() or proc.stdout.strip())[-4000:])
    return json.loads(proc.stdout)


def main(argv=None):
    args = json.loads((argv or sys.argv[1:])[0])
    try:
        dag = read_jobs(args["snakefile"], args["workdir"], args["configfiles"], args.get("forceall", False))
    except Exception as e:  # noqa: BLE001 -- Snakemake reports config errors as several exception types
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    json.dump(dag, sys.stdout)


if __name__ == "__main__":
    main()
