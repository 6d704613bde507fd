"""What a rule's job is given besides its files: its resources, its launcher, its JSON params and the generate
rule's decoding options, derived from the validated config when the rule files are read.

Cluster specifics (partition, account) live in ``profiles/slurm/config.yaml``. The one exception is a policy
(or SFT) spanning nodes (``training.nodes`` > 1): its resources are Slurm executor keys (``nodes``, ``tasks``, ``gres``,
``mpi``) and its launcher is ``srun`` + torchrun, because only the config knows the shape of that job.
"""
from __future__ import annotations

import json
import re
import shlex


def params_json(obj) -> str:
    """``obj`` as JSON (sorted keys) for a rule's params, with every brace inside a string written as a
    ``\\u007b``/``\\u007d`` escape: the same JSON value, but Snakemake reads ``{name}`` in a params string
    as a wildcard (a text template such as probe.data.template holds ``{prompt}``)."""
    def escape(m: re.Match) -> str:
        return m[0].replace("{", "\\u007b").replace("}", "\\u007d")

    return re.sub(r'"(?:[^"\\]|\\.)*"', escape, json.dumps(obj, sort_keys=True))


# resource groups whose jobs train on training.devices processes (training_launcher): a policy, and SFT
TRAINING_GROUPS = ("train_policy", "sft")


def rule_resources(config: dict, group: str) -> dict:
    """mem_mb, runtime and gpu of a group of config ``resources``: a policy or SFT needs a GPU per training process
    (``training.devices``), a vLLM generation job one per tensor-parallel rank. A policy or SFT spanning nodes
    (``training.nodes`` > 1) asks instead for that many nodes with devices/nodes GPUs each (``gres``, per
    node; mem_mb is per node too) and one task per node, and runs its own ``srun`` (``mpi``: the Slurm
    executor then starts the job's command directly instead of inside a one-task ``srun``)."""
    r = config["resources"][group]
    t, e = config["training"], config["evaluation"]
    base = {"mem_mb": r["mem_mb"], "runtime": r["runtime"]}
    if group in TRAINING_GROUPS and t["nodes"] > 1:
        # tasks_per_gpu 0: the plugin would otherwise read `tasks` as tasks per GPU
        return base | {"nodes": t["nodes"], "tasks": t["nodes"], "tasks_per_gpu": 0, "mpi": "srun",
                       "gres": f"gpu:{max(r['gpu'], t['devices'] // t['nodes'])}"}
    gpu = r["gpu"]
    if group in TRAINING_GROUPS:
        gpu = max(gpu, t["devices"])
    if group == "generate" and e["backend"] == "vllm":
        gpu = max(gpu, e["tensor_parallel_size"])
    return base | {"gpu": gpu}


def training_launcher(config: dict) -> str:
    """``python``, or torchrun with one process per device when ``training.devices`` > 1 (``--standalone``
    picks a free rendezvous port on the node, so parallel jobs do not collide); across
    ``training.nodes`` > 1, srun starting one torchrun per node (``srun_torchrun``)."""
    t = config["training"]
    if t["nodes"] > 1:
        return srun_torchrun(t["nodes"], 1, t["devices"] // t["nodes"])
    return "python" if t["devices"] == 1 else f"python -m torch.distributed.run --standalone --nproc_per_node {t['devices']}"


def srun_torchrun(nodes: int, tasks_per_node: int, procs_per_task: int) -> str:
    """The command prefix that starts ``nodes`` x ``tasks_per_node`` torchruns of ``procs_per_task`` processes each
    inside the job's Slurm allocation: ``srun`` starts the torchruns (one per node on a cluster:
    ``tasks_per_node`` 1), which meet at a c10d rendezvous on the host running the job script, the
    allocation's first node, on a port derived from the job id (two jobs sharing a node do not collide).
    ``--kill-on-bad-exit`` ends every task when one fails, so a dead node does not leave the others waiting."""
    tasks = nodes * tasks_per_node
    return (": \"${SLURM_JOB_ID:?training.nodes > 1 runs inside a Slurm allocation: use --profile profiles/slurm}\"; "
            f"srun --nodes={nodes} --ntasks={tasks} --ntasks-per-node={tasks_per_node} --kill-on-bad-exit=1"
            f" python -m torch.distributed.run --nnodes {tasks} --nproc_per_node {procs_per_task}"
            " --rdzv_backend c10d --rdzv_endpoint \"$(hostname):$((29400 + SLURM_JOB_ID % 1000))\""
            " --rdzv_id \"$SLURM_JOB_ID\"")


def generation_args(config: dict) -> str:
    """Decoding options of workflow.generate from config evaluation (greedy unless do_sample)."""
    e = config["evaluation"]
    args = (f"--backend {e['backend']} --seed {e['seed']} --precision {config['training']['precision']}"
            f" --samples {e['samples']} --stop-json {shlex.quote(json.dumps(e['stop']))}")
    args += f" --tensor-parallel-size {e['tensor_parallel_size']}" if e["backend"] == "vllm" else ""
    return args + (f" --do-sample --temperature {e['temperature']} --top-p {e['top_p']}" if e["do_sample"] else "")


def judge_backend(config: dict, judge: str) -> str | None:
    """The engine of an LLM judge: its entry's ``backend``, else evaluation.backend (None for a rule-based judge)."""
    spec = config["judges"][judge]
    if spec["type"] == "refusal_markers":
        return None
    return spec.get("backend") or config["evaluation"]["backend"]


def judge_spec(config: dict, judge: str) -> dict:
    """A judge's config entry as its jobs receive it: with ``backend: vllm`` filled in when it follows
    evaluation.backend there (a transformers judge's entry is passed unchanged, so its jobs' params are too)."""
    spec = config["judges"][judge]
    return {**spec, "backend": "vllm"} if judge_backend(config, judge) == "vllm" else spec
