"""A finished run grows without redoing work: what a user adds next to the finished default (issue 25's table).

Each row of the table is one test on a copy of the finished tiny reference run, which keeps its policies as the
default does (``training.keep_policies``, the default's own setting): adding a judge, a method, a seed, a noise
rate or two benchmarks (a CSV and a ``.txt`` list) plans exactly the new jobs. "Exactly": the planned jobs, rule
by rule, are the ones the addition needs, and apart from the summaries over every model (the report's tables,
figures and page, the perturbation and agreement tables) no planned job writes a file the finished run has:
nothing finished is recomputed. Dry runs show the plans; the benchmark row, the one whose policies a smaller
disk budget once deleted, also runs, and every file of the finished run other than those summaries keeps its
bytes and its mtime.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import yaml

from conftest import LATE_BENCHMARKS, copy_run, job_blocks, jobs_run, run_snakemake, write_config
from test_reliability import fingerprints

# rules that summarise every model (or every judge, or every ShaPO policy): any addition redoes them
SUMMARIES = {"report_tables", "report_figures", "report", "perturbation_summary", "judge_agreement", "all"}
REPORT = Counter(report_tables=1, report_figures=1, report=1, all=1)


def grown(reference_run, tmp_path: Path, edit) -> tuple[Path, dict]:
    """A copy of the finished reference run with ``edit`` applied to its config."""
    workdir = copy_run(reference_run[0], tmp_path / "run")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    assert config["training"]["keep_policies"] == yaml.safe_load(
        (Path(__file__).resolve().parents[1] / "config.yaml").read_text())["training"]["keep_policies"]
    edit(config)
    write_config(workdir, config)
    return workdir, config


def planned(workdir: Path, expected: Counter) -> list[dict]:
    """The dry run's jobs, checked: these rules as often as ``expected``, and no job but a summary writes a file
    that exists."""
    blocks = job_blocks((proc := run_snakemake(workdir, "--dry-run")).stdout + proc.stderr)
    assert Counter(b["rule"] for b in blocks) == expected
    rewritten = {b["rule"]: [o for o in b.get("output", "").split(", ") if o and (workdir / o).exists()]
                 for b in blocks if b["rule"] not in SUMMARIES}
    assert not any(rewritten.values()), {rule: files for rule, files in rewritten.items() if files}
    return blocks


def wildcard(block: dict, name: str) -> str:
    return dict(part.split("=", 1) for part in block["wildcards"].split(", "))[name]


def test_adding_a_judge_plans_only_its_judgements(reference_run, tmp_path):
    def edit(config):
        config["judges"]["my_markers"] = {"type": "refusal_markers", "markers": ["i cannot"], "builtin_markers": False}
        config["evaluation"]["judges"].append("my_markers")

    workdir, _ = grown(reference_run, tmp_path, edit)
    blocks = planned(workdir, Counter(judge=5 * 2, judge_agreement=1) + REPORT)  # 5 models x 2 benchmarks
    assert {wildcard(b, "judge") for b in blocks if b["rule"] == "judge"} == {"my_markers"}


def test_adding_a_method_plans_only_its_policies(reference_run, tmp_path):
    workdir, _ = grown(reference_run, tmp_path, lambda config: config["methods"].append("drdpo"))
    blocks = planned(workdir, Counter(train_policy=2, generate=2 * 2, judge=2 * 2, score_preferences=2) + REPORT)
    assert {wildcard(b, "method") for b in blocks if b["rule"] == "train_policy"} == {"drdpo"}


def test_adding_a_seed_plans_only_its_noise_and_policies(reference_run, tmp_path):
    workdir, _ = grown(reference_run, tmp_path, lambda config: config.update(seeds=[0, 1]))
    # 2 methods x 2 noise rates at seed 1; shapo's new logs join the perturbation table
    blocks = planned(workdir, Counter(inject_noise=2, train_policy=4, generate=4 * 2, judge=4 * 2, score_preferences=4,
                                      perturbation_summary=1) + REPORT)
    assert {wildcard(b, "seed") for b in blocks if b["rule"] in ("inject_noise", "train_policy")} == {"1"}


def test_adding_a_noise_rate_plans_only_its_noise_and_policies(reference_run, tmp_path):
    workdir, _ = grown(reference_run, tmp_path, lambda config: config["noise"]["rates"].append(0.2))
    blocks = planned(workdir, Counter(inject_noise=1, train_policy=2, generate=2 * 2, judge=2 * 2, score_preferences=2,
                                      perturbation_summary=1) + REPORT)
    assert {wildcard(b, "noise") for b in blocks if b["rule"] in ("inject_noise", "train_policy")} == {"0.2"}


def test_adding_two_benchmarks_runs_only_their_jobs_and_recomputes_nothing(reference_run, benchmarks_added_run,
                                                                          tmp_path):
    """The issue's last row, run (conftest.py's benchmarks_added_run: a CSV benchmark and a .txt list of prompts
    added to the finished run): no policy is retrained, nothing is rescored and no old benchmark is answered
    again; every file of the finished run but the summaries' keeps its bytes and mtime (the copy kept them), and a
    rerun then has nothing to do."""
    finished, (workdir, proc) = reference_run[0], benchmarks_added_run
    expected = Counter(prepare_benchmark=2, sample_benchmark=2, generate=5 * 2, judge=5 * 2) + REPORT
    blocks = job_blocks(proc.stdout + proc.stderr)
    assert Counter(jobs_run(proc)) == Counter(b["rule"] for b in blocks) == expected
    assert {wildcard(b, "benchmark") for b in blocks if "wildcards" in b} == set(LATE_BENCHMARKS)
    rewritten = [o for b in blocks if b["rule"] not in SUMMARIES for o in b["output"].split(", ")
                 if (finished / o).exists()]
    assert rewritten == []
    # the summaries were rewritten: their outputs, logs and benchmark records; nothing else was
    summaries = {p for b in blocks if b["rule"] in SUMMARIES
                 for field in ("output", "log", "benchmark") for p in b.get(field, "").split(", ") if p}
    before, after = fingerprints(finished, ["results"]), fingerprints(workdir, ["results"])
    assert sum(p.startswith("results/policies/") and p.endswith("model.safetensors") for p in before) == 4
    changed = {p for p, stamp in before.items() if after.get(p) != stamp}
    assert changed <= summaries, sorted(changed - summaries)
    assert "results/report.md" in changed  # the report did run again
    table = (workdir / "results/tables/harmful_rate.csv").read_text()
    assert ",late," in table and ",mine," in table
    assert jobs_run(run_snakemake(copy_run(workdir, tmp_path / "run"))) == []  # a run locks its folder: a copy
