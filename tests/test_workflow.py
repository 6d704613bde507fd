"""The real Snakemake DAG on the tiny config: end to end, reruns, and bad input."""
import csv
import itertools
import json

import yaml

from conftest import copy_run, jobs_run, run_snakemake


def read_table(workdir):
    with open(workdir / "results/tables/harmful_rate.csv") as f:
        return list(csv.DictReader(f))


def test_full_dag_writes_table_figure_logs_and_benchmarks(reference_run):
    workdir, proc = reference_run
    ran = jobs_run(proc)
    assert ran.count("train_policy") == 4 and ran.count("generate") == 10 and ran.count("judge") == 10
    rows = read_table(workdir)
    cells = {(r["method"], r["noise"], r["benchmark"]) for r in rows}
    expected = {(m, n, b) for m in ("dpo", "shapo") for n in ("0.0", "0.25") for b in ("harmbench", "donotanswer")}
    assert expected | {("base", "", "harmbench"), ("base", "", "donotanswer")} == cells
    assert all(0.0 <= float(r["harmful_rate"]) <= 1.0 and r["prompts"] == "3" for r in rows)
    # the random tiny model babbles without refusal markers: every answer is judged unsafe
    assert {r["harmful_rate"] for r in rows} == {"1.0"}
    png = (workdir / "results/figures/harmful_rate_vs_noise.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
    md = (workdir / "results/tables/harmful_rate.md").read_text()
    assert "| base | — |" in md and "| shapo | 0.25 |" in md
    # every job wrote a log and a benchmark record
    assert (workdir / "results/logs/train_policy/shapo_noise0.25_seed0.log").exists()
    assert (workdir / "results/benchmarks/train_policy/shapo_noise0.25_seed0.tsv").exists()
    # stage outputs that analyses rely on
    noisy = [json.loads(l) for l in open(workdir / "results/data/noisy/noise0.25/seed0.jsonl")]
    assert sum(r["flipped"] for r in noisy) == 3  # round(0.25 * 12)
    log = list(csv.DictReader(open(workdir / "results/policies/shapo/noise0.25/seed0.train_log.tsv"), delimiter="\t"))
    assert {"loss", "margin", "acc_clean", "acc_flipped", "sharpness_step"} <= set(log[0])
    assert (workdir / "results/policies/shapo/noise0.25/seed0/model.safetensors").exists()
    decon = list(csv.DictReader(open(workdir / "results/probe/decontamination.tsv"), delimiter="\t"))
    assert {"class": "unsafe", "benchmark": "harmbench", "removed": "1"}.items() <= next(
        r for r in decon if r["class"] == "unsafe" and r["benchmark"] == "harmbench").items()


def test_rerun_with_nothing_changed_runs_no_job(reference_run, tmp_path):
    workdir = copy_run(reference_run[0], tmp_path / "run")  # a run locks its folder: other tests copy this one
    proc = run_snakemake(workdir)
    assert jobs_run(proc) == []
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_forcerun_reruns_only_that_rule_and_its_dependants(reference_run, tmp_path):
    workdir = copy_run(reference_run[0], tmp_path / "run")
    proc = run_snakemake(workdir, "--forcerun", "report")
    assert jobs_run(proc) == ["report", "all"]


def test_changed_parameter_reruns_only_the_affected_part(reference_run, sharpness_run):
    """shapo's sharpness interval changed, two methods added, one noise rate and one benchmark kept
    (conftest.py's sharpness_run): only the changed and the new methods train, answer and are scored, then the
    report; dpo's policy, answers and scores are the reference run's files, untouched."""
    workdir, proc = sharpness_run
    ran = sorted(jobs_run(proc))
    assert ran == sorted(["train_policy"] * 3 + ["generate"] * 3 + ["judge"] * 3 + ["score_preferences"] * 3
                         + ["perturbation_summary", "report_tables", "report_figures", "report", "all"])
    for rel in ["results/policies/dpo/noise0.25/seed0/model.safetensors",
                "results/generations/dpo/noise0.25/seed0/harmbench.jsonl",
                "results/judgements/refusal_markers/dpo/noise0.25/seed0/harmbench.jsonl",
                "results/preference_scores/dpo/noise0.25/seed0.json"]:
        before, after = reference_run[0] / rel, workdir / rel
        assert after.stat().st_mtime_ns == before.stat().st_mtime_ns and after.read_bytes() == before.read_bytes(), rel
    dpo = {r["harmful_rate"] for r in read_table(workdir) if r["method"] == "dpo"}
    assert dpo == {r["harmful_rate"] for r in read_table(reference_run[0])
                   if (r["method"], r["noise"], r["benchmark"]) == ("dpo", "0.25", "harmbench")}


def test_new_sample_size_reruns_generation_but_not_the_probe_or_the_policies(reference_run, tmp_path):
    """all.jsonl (what the probe is de-duplicated against) is its own rule's output, apart from the sample."""
    workdir = copy_run(reference_run[0], tmp_path / "run")
    config = yaml.safe_load(open(workdir / "config.yaml"))
    config["benchmarks"]["harmbench"]["n_prompts"] = 2  # a benchmark's own sample size
    yaml.safe_dump(config, open(workdir / "config.yaml", "w"))
    proc = run_snakemake(workdir, "--dry-run")
    ran = sorted(jobs_run(proc))
    # base + 2 methods x 2 noise rates answer the new HarmBench sample; nothing upstream reruns
    assert ran == sorted(["sample_benchmark"] + ["generate"] * 5 + ["judge"] * 5
                         + ["report_tables", "report_figures", "report", "all"])


def test_every_cell_of_the_main_table_follows_its_own_answers(reference_run, tmp_path):
    """A mislabelled cell (one model's rate under another's name) must fail. The tiny run's answers are
    judged again by a refusal-marker judge whose own markers are words of the answers, picked so that the
    cells' rates differ as much as they can, and each cell is recomputed here from its own generation file.
    (dpo and shapo give identical answers on the tiny model, so only their two cells may stay equal.)"""
    workdir = copy_run(reference_run[0], tmp_path / "run")
    answers = {}  # (method, noise, benchmark) -> answers
    for path in sorted((workdir / "results/generations").rglob("*.jsonl")):
        parts = path.relative_to(workdir / "results/generations").with_suffix("").parts
        noise = "" if parts[0] == "base" else str(float(parts[1][len("noise"):]))
        answers[(parts[0], noise, parts[-1])] = [json.loads(line)["answer"] for line in open(path)]
    assert len(answers) == 10

    def rates(markers):  # the judge's rule: safe when the answer is empty or contains a marker
        return {cell: sum(bool(a.strip()) and not any(m in a.lower() for m in markers) for a in texts) / len(texts)
                for cell, texts in answers.items()}

    def told_apart(markers):
        r = rates(markers)
        return sum(r[a] != r[b] for a, b in itertools.combinations(r, 2))

    words = sorted({w for texts in answers.values() for a in texts for w in a.lower().split() if len(w) >= 3})
    markers = []
    while (best := max(words, key=lambda w: (told_apart(markers + [w]), w))) and \
            told_apart(markers + [best]) > told_apart(markers):
        markers.append(best)
    expected = rates(markers)
    assert len(set(expected.values())) >= 3, expected  # else the check below could not see a swap

    config = yaml.safe_load(open(workdir / "config.yaml"))
    config["judges"]["cells"] = {"type": "refusal_markers", "markers": markers, "builtin_markers": False}
    config["evaluation"]["judges"] = ["cells", *config["evaluation"]["judges"]]  # the primary judge: the main table
    yaml.safe_dump(config, open(workdir / "config.yaml", "w"))
    proc = run_snakemake(workdir)
    assert "train_policy" not in jobs_run(proc) and jobs_run(proc).count("judge") == 10
    table = {(r["method"], r["noise"], r["benchmark"]): float(r["harmful_rate"]) for r in read_table(workdir)}
    assert table == expected


def test_policies_not_kept_are_deleted_once_used_and_retrain_nothing(reference_run, tmp_path):
    """training.keep_policies false (the default keeps them): a policy is a temp() output; switching it off changes
    no result, so nothing is retrained, and the policies go once every job that reads them is done."""
    workdir = copy_run(reference_run[0], tmp_path / "run")
    config = yaml.safe_load(open(workdir / "config.yaml"))
    config["training"]["keep_policies"] = False
    yaml.safe_dump(config, open(workdir / "config.yaml", "w"))
    # only the report reruns: it prints the whole config it was made with
    assert sorted(jobs_run(run_snakemake(workdir))) == ["all", "report"]
    run_snakemake(workdir, "--delete-temp-output")  # what a run does after the last reader of each policy
    assert not list((workdir / "results/policies").glob("*/noise*/seed*/model.safetensors"))
    assert list((workdir / "results/policies").glob("*/noise*/seed*.train_log.tsv"))  # the logs stay
    assert jobs_run(run_snakemake(workdir)) == []  # answers and scores exist: the missing policies are not retrained
