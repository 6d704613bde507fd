"""The real Snakemake DAG on the tiny config: end to end, reruns, and bad input."""
import csv
import json

import pytest
import yaml

from conftest import jobs_run, run_snakemake


def read_table(workdir):
    with open(workdir / "results/tables/harmful_rate.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model_dir):
    """One complete run of the tiny workflow, shared by the rerun tests below (in file order)."""
    from conftest import tiny_config

    workdir = tmp_path_factory.mktemp("tiny-run")
    with open(workdir / "config.yaml", "w") as f:
        yaml.safe_dump(tiny_config(tiny_model_dir), f)
    proc = run_snakemake(workdir)
    return workdir, proc


def test_full_dag_writes_table_figure_logs_and_benchmarks(finished):
    workdir, proc = finished
    ran = jobs_run(proc)
    assert ran.count("train_policy") == 4 and ran.count("generate") == 10 and ran.count("judge") == 10
    rows = read_table(workdir)
    cells = {(r["method"], r["noise"], r["benchmark"]) for r in rows}
    expected = {(m, n, b) for m in ("dpo", "shapo") for n in ("0.0", "0.25") for b in ("harmbench", "donotanswer")}
    assert expected | {("base", "", "harmbench"), ("base", "", "donotanswer")} == cells
    assert all(0.0 <= float(r["harmful_rate"]) <= 1.0 and r["prompts"] == "3" for r in rows)
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


def test_rerun_with_nothing_changed_runs_no_job(finished):
    workdir, _ = finished
    proc = run_snakemake(workdir)
    assert jobs_run(proc) == []
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_forcerun_reruns_only_that_rule_and_its_dependants(finished):
    workdir, _ = finished
    proc = run_snakemake(workdir, "--forcerun", "report")
    assert jobs_run(proc) == ["report", "all"]


def test_changed_parameter_reruns_only_the_affected_part(finished):
    workdir, _ = finished
    before = {(r["method"], r["noise"], r["benchmark"]): r["harmful_rate"] for r in read_table(workdir)}
    dpo_weights = (workdir / "results/policies/dpo/noise0/seed0/model.safetensors").stat().st_mtime_ns
    config = yaml.safe_load(open(workdir / "config.yaml"))
    config["presets"]["shapo"]["sharpness"]["interval"] = 2
    yaml.safe_dump(config, open(workdir / "config.yaml", "w"))
    proc = run_snakemake(workdir)
    ran = sorted(jobs_run(proc))
    assert ran == sorted(["train_policy"] * 2 + ["generate"] * 4 + ["judge"] * 4 + ["report", "all"])
    assert (workdir / "results/policies/dpo/noise0/seed0/model.safetensors").stat().st_mtime_ns == dpo_weights
    assert len(read_table(workdir)) == len(before)


def dry_run_error(workdir, edit):
    config = yaml.safe_load(open(workdir / "config.yaml"))
    edit(config)
    yaml.safe_dump(config, open(workdir / "config.yaml", "w"))
    proc = run_snakemake(workdir, "--dry-run", check=False)
    assert proc.returncode != 0
    return proc.stdout + proc.stderr


def test_unknown_method_is_named(workdir):
    out = dry_run_error(workdir, lambda c: c.update(methods=["dpo", "shapoo"]))
    assert "config key methods: unknown method 'shapoo'" in out


def test_unknown_key_and_wrong_type_are_named(workdir):
    out = dry_run_error(workdir, lambda c: c["training"].update(learning_rate=1e-5))
    assert "config key training: Additional properties are not allowed ('learning_rate' was unexpected)" in out
    out = dry_run_error(workdir, lambda c: c["training"].update(batch_size="four"))
    assert "config key training.batch_size: 'four' is not of type 'integer'" in out
    out = dry_run_error(workdir, lambda c: c["noise"].update(rates=[0.0, 0.6]))
    assert "config key noise.rates.1" in out


def test_missing_dataset_path_is_named(workdir, tmp_path):
    missing = str(tmp_path / "no-such-file.jsonl.gz")
    out = dry_run_error(workdir, lambda c: c["preferences"].update(source={"path": missing}))
    assert f"config key preferences.source: path '{missing}' does not exist" in out
    out = dry_run_error(workdir, lambda c: c["model"].update(name_or_path=str(tmp_path / "no-model")))
    assert "config key model.name_or_path" in out and "does not exist" in out


def test_unsupported_mlp_layout_stops_the_first_job(workdir, tmp_path):
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    opt = tmp_path / "tiny-opt"
    OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, ffn_dim=32, num_hidden_layers=1, num_attention_heads=2,
                             word_embed_proj_dim=16)).save_pretrained(opt)
    AutoTokenizer.from_pretrained(_tokenizer_dir(workdir)).save_pretrained(opt)
    config = yaml.safe_load(open(workdir / "config.yaml"))
    config["model"]["name_or_path"] = str(opt)
    yaml.safe_dump(config, open(workdir / "config.yaml", "w"))
    proc = run_snakemake(workdir, "results/models/base", check=False)
    assert proc.returncode != 0
    log = (workdir / "results/logs/prepare_model.log").read_text()
    assert "model type 'opt'" in log and "no supported MLP output projection" in log
    assert not (workdir / "results/models/base").exists()


def _tokenizer_dir(workdir):
    return yaml.safe_load(open(workdir / "config.yaml"))["model"]["name_or_path"]
