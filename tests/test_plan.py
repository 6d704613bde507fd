"""The cost projection (workflow/plan.py, workflow/lib/cost.py, workflow/lib/dag.py): its arithmetic on jobs written
out here, and the paper config's real DAG read through Snakemake, before submission."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT
from workflow.lib.config import fill_defaults
from workflow.lib.cost import (DEVICES, Assumptions, Model, assumptions_for, device_with, job_cost, job_gpus,
                               parse_overrides, project, safetensors_parameters)

N = 1_000_000_000  # a round model size for the arithmetic


def config(**changes) -> dict:
    """config.yaml with the schema's defaults, one model of N parameters; ``changes``: section -> keys."""
    c = fill_defaults(yaml.safe_load((ROOT / "config.yaml").read_text()), "")
    c["model"]["name_or_path"] = "m"
    for section, keys in changes.items():
        c[section].update(keys)
    return c


def model(c=None, device="h100-80gb", **overrides) -> Model:
    d = DEVICES[device]
    return Model(c or config(), d, assumptions_for(d, overrides), {"m": N, "judge-8b": 8 * N})


def job(rule, wildcards=None, gpu=1, threads=2, inputs=(), group=None, local=False) -> dict:
    return {"rule": rule, "wildcards": wildcards or {}, "input": list(inputs), "output": [], "threads": threads,
            "resources": {"gpu": gpu}, "group": group, "local": local}


def test_a_training_step_is_6n_per_token_and_a_sharpness_step_one_more_pass():
    c = config(preferences={"n_train": 64}, training={"batch_size": 4, "max_length": 128, "checkpoint_every": 0})
    m = model(c, train_fill=1.0)
    h100 = DEVICES["h100-80gb"]
    dpo = job_cost(m, job("train_policy", {"method": "dpo"}, gpu=1))
    shapo = job_cost(m, job("train_policy", {"method": "shapo"}, gpu=1))  # interval 5
    tokens = 16 * 4 * 2 * 128  # 16 steps x 4 pairs x chosen and rejected x 128 tokens
    assert dpo.compute == pytest.approx(6 * N * tokens / (h100.flops * m.a.mfu_train))
    assert shapo.compute == pytest.approx(dpo.compute * (16 + 16 // 5) / 16)
    # 8 GPUs share the FLOPs; the load and start-up do not shrink
    eight = job_cost(m, job("train_policy", {"method": "dpo"}, gpu=8))
    assert eight.compute == pytest.approx(dpo.compute / 8) and eight.loading == dpo.loading and eight.gpus == 8
    # a checkpoint every 4 of 16 steps: 3 of them (none after the last step), weights + AdamW state
    ckpt = job_cost(model(config(preferences={"n_train": 64}, training={"batch_size": 4, "checkpoint_every": 4})),
                    job("train_policy", {"method": "dpo"}))
    assert ckpt.write == pytest.approx((3 * N * (4 + 8) + N * 4) / m.a.write_rate)


def test_decoding_is_bandwidth_bound_until_the_batch_makes_it_compute_bound():
    m = model()
    h100 = DEVICES["h100-80gb"]
    weights = N * 2 / (h100.bandwidth * m.a.bandwidth_efficiency)
    assert m.decode_step(N, 1, "vllm") == pytest.approx(weights + m.a.step_overhead_vllm)
    big = 10_000  # 2·N·batch FLOPs outgrow the weight read
    assert m.decode_step(N, big, "vllm") == pytest.approx(2 * N * big / (h100.flops * m.a.mfu_forward)
                                                          + m.a.step_overhead_vllm)
    # transformers: every batch of 8 runs its max_new_tokens steps; vLLM: answers x tokens over its batch
    assert m.decode(N, 100, 32, 8, "transformers", 1.0) == pytest.approx(13 * 32 * m.decode_step(N, 8, "transformers"))
    assert m.decode(N, 1000, 32, 8, "vllm", 0.5) == pytest.approx(
        math.ceil(1000 * 32 * 0.5 / 256) * m.decode_step(N, 256, "vllm"))


def test_an_llm_judge_job_loads_once_for_all_its_answers_files():
    c = config()
    c["judges"]["guard"] = fill_defaults({"type": "llama_guard_3", "model": "judge-8b", "backend": "vllm"}, "judges/guard")
    files = [f"results/generations/dpo/noise{n}/seed0/harmbench.jsonl" for n in ("0", "0.4")]
    m = model(c)
    one = job_cost(m, job("judge", {"judge": "guard"}, inputs=files[:1]))
    both = job_cost(m, job("llm_judge", {"judge": "guard"}, inputs=files))
    assert both.loading == one.loading == m.a.process_start_s + m.a.vllm_start_s + 8 * N * 2 / m.a.read_rate
    assert both.compute == pytest.approx(2 * one.compute)
    markers = job_cost(m, job("judge", {"judge": "refusal_markers"}, gpu=0, inputs=files[:1]))
    assert (markers.seconds, markers.gpus) == (m.a.light_job_s["pandas"], 0)


def test_submissions_count_local_jobs_as_none_and_a_group_as_one():
    m = model()
    jobs = [job("generate", {"benchmark": "harmbench"}, group="eval#0"),
            job("judge", {"judge": "refusal_markers"}, gpu=0, group="eval#0",
                inputs=["results/generations/base/harmbench.jsonl"]),
            job("inject_noise", gpu=0, local=True), job("inject_noise", gpu=0, local=True),
            job("score_preferences"), job("all", gpu=0, local=True)]
    rows, totals = project(m, jobs)
    assert (totals["jobs"], totals["submissions"], totals["local"], totals["groups"]) == (5, 2, 2, 1)
    by_rule = {r.rule: r for r in rows}
    generate = job_cost(m, jobs[0])
    # the group holds the generation job's GPU while its refusal-marker judgement runs
    assert by_rule["judge"].gpu_seconds == pytest.approx(m.a.light_job_s["pandas"] * generate.gpus)
    assert by_rule["inject_noise"].gpu_seconds == 0 and by_rule["inject_noise"].local == 2


def test_gpus_of_a_job_spanning_nodes_and_overrides_name_their_key():
    assert job_gpus({"gpu": 8}) == 8 and job_gpus({"nodes": 2, "gres": "gpu:4"}) == 8
    assert parse_overrides(["mfu_train=0.4", "benchmark_sizes.saladbench=5000"]) == {
        "mfu_train": 0.4, "benchmark_sizes": {**Assumptions().benchmark_sizes, "saladbench": 5000.0}}
    with pytest.raises(SystemExit, match="--set 'mfu=0.4': expected NAME=VALUE with NAME one of mfu_train"):
        parse_overrides(["mfu=0.4"])
    assert device_with(DEVICES["h100-80gb"], ["device.bandwidth=2e12"]).bandwidth == 2e12
    with pytest.raises(SystemExit, match="expected device.NAME=VALUE with NAME one of flops"):
        device_with(DEVICES["h100-80gb"], ["device.speed=1"])
    # this machine's figures replace the GPU node's; an override wins over both
    assert assumptions_for(DEVICES["cpu-2core"]).process_start_s == 6.5
    assert assumptions_for(DEVICES["cpu-2core"], {"process_start_s": 3.0}).process_start_s == 3.0


def test_parameters_of_a_local_model_come_from_its_safetensors_headers(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    # tied embeddings count once, as in the file
    expected = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert safetensors_parameters(Path(tiny_model_dir)) == expected
    m = Model(config(), DEVICES["h100-80gb"], Assumptions(), {})
    assert m.n(str(tiny_model_dir)) == expected
    with pytest.raises(SystemExit, match="no parameter count for model 'org/unknown': give it with --params"):
        m.n("org/unknown")


@pytest.mark.workflow
def test_the_paper_run_projected_before_submission(tmp_path):
    """The plan command on config/paper.yaml reads Snakemake's own DAG: the paper's jobs per rule, the shapes of
    docs/cost.md (local data jobs, groups, one vLLM judge job per method, seed and benchmark), totals."""
    shutil.copy(ROOT / "config.yaml", tmp_path / "config.yaml")
    (tmp_path / "vllm.yaml").write_text("evaluation: {backend: vllm}\n")

    def plan(*configfiles) -> dict:
        out = tmp_path / "plan.json"
        proc = subprocess.run([sys.executable, "-m", "workflow.plan", "--directory", str(tmp_path), "--gpu", "a100-80gb",
                               "--json", str(out), "--configfile", str(ROOT / "config/paper.yaml"), *configfiles],
                              capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Slurm submissions:" in proc.stdout
        return json.loads(out.read_text())

    transformers = plan()
    rules = {r["rule"]: r for r in transformers["rules"]}
    assert rules["judge"]["jobs"] == 3 * 364 and rules["generate"]["jobs"] == 364 and rules["train_policy"]["jobs"] == 90
    assert rules["train_policy"]["gpus"] == [8] and rules["generate"]["gpus"] == [1]
    assert rules["inject_noise"]["local"] == 5 and rules["generate"]["grouped"] == 364
    assert rules["judge"]["grouped"] == 364 and rules["judge"]["submitted"] == 728  # refusal markers ride along
    assert transformers["totals"]["submissions"] == 1281 and transformers["totals"]["jobs"] == 1666
    vllm = plan(str(tmp_path / "vllm.yaml"))
    rules = {r["rule"]: r for r in vllm["rules"]}
    # 2 LLM judges x 18 methods x 1 seed x 4 benchmarks, 5 noise rates each; the base model's answers per file
    assert rules["llm_judge"]["jobs"] == 144 and rules["judge"]["jobs"] == 364 + 2 * 4
    assert vllm["totals"]["submissions"] == 705
    assert vllm["totals"]["gpu_hours"] < transformers["totals"]["gpu_hours"]
    assert not (tmp_path / "results").exists()  # planning writes nothing
