"""config/paper.yaml dry-runs offline, and a null in a --configfile removes an entry of config.yaml."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import yaml

from conftest import ROOT, SNAKEMAKE_ENV, run_snakemake

# No hub access may happen while the DAG is built: offline mode, and an endpoint that refuses.
OFFLINE_ENV = {**SNAKEMAKE_ENV, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}


def job_counts(text: str) -> dict[str, int]:
    """The dry-run's job table: rule -> count."""
    return {m[1]: int(m[2]) for m in re.finditer(r"^([a-z_]+)\s+(\d+)$", text, re.M) if m[1] != "total"}


def dry_run_paper(workdir, *extra_configfiles):
    shutil.copy(ROOT / "config.yaml", workdir / "config.yaml")  # the default it is merged onto
    cmd = [sys.executable, "-m", "snakemake", "-n", "-p", "--snakefile", str(ROOT / "Snakefile"),
           "--directory", str(workdir), "--cores", "2", "--configfile", str(workdir / "config.yaml"),
           str(ROOT / "config/paper.yaml"), *map(str, extra_configfiles)]
    return subprocess.run(cmd, capture_output=True, text=True, env=OFFLINE_ENV, cwd=workdir)


def shell_commands(text: str, rule: str) -> list[str]:
    """Shell commands the dry-run printed for ``rule`` (one per job)."""
    blocks = re.split(r"\n(?=\[)", text)
    return [b.split("Shell command: ", 1)[1] for b in blocks if f"rule {rule}:" in b and "Shell command: " in b]


def test_paper_config_dry_runs_offline(tmp_path):
    proc = dry_run_paper(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    counts = job_counts(out)
    # 2 methods x 5 noise rates x 1 seed; 3 benchmarks x (base + 10 policies); the SFT stage once
    assert counts["train_policy"] == 10 and counts["inject_noise"] == 5
    assert counts["sft"] == 1 and counts["prepare_benchmark"] == 3
    # three judges (MD-Judge, Nemotron, refusal markers) label every answer; their agreement table once
    assert counts["generate"] == 33 and counts["judge"] == 99 and counts["judge_agreement"] == 1

    paper = yaml.safe_load((ROOT / "config/paper.yaml").read_text())
    (model_cmd,) = shell_commands(out, "prepare_model")
    assert paper["model"]["name_or_path"] in model_cmd
    (prefs_cmd,) = shell_commands(out, "prepare_preferences")
    assert "PKU-Alignment/PKU-SafeRLHF-30K" in prefs_cmd and "--format pku-saferlhf" in prefs_cmd
    assert '"path"' not in prefs_cmd  # the default's local path did not leak into the hub source
    (probe_cmd,) = shell_commands(out, "probe_data")
    assert '"format": "pku-saferlhf"' in probe_cmd and '"unsafe"' not in probe_cmd
    assert "advbench" not in out  # removed with `advbench: null`
    bench_cmds = " ".join(shell_commands(out, "prepare_benchmark"))
    assert "walledai/SaladBench" in bench_cmds and "FunctionalCategory" not in bench_cmds
    # policies and the reference start from the SFT model; training uses RMSprop at 5e-7
    for cmd in shell_commands(out, "train_policy") + shell_commands(out, "reference_logps"):
        assert "--model results/models/sft " in cmd
    assert all('"optimizer": "rmsprop"' in c and '"lr": 5e-07' in c for c in shell_commands(out, "train_policy"))
    # GPU stages ask for a GPU, the rest do not; a policy trains data-parallel on training.devices GPUs
    assert re.search(r"rule train_policy:(?:(?!\nrule ).)*resources:[^\n]*gpu=8", out, re.S)
    assert all(c.startswith("python -m torch.distributed.run --standalone --nproc_per_node 8 -m workflow.train_policy")
               for c in shell_commands(out, "train_policy"))
    assert re.search(r"rule reference_logps:(?:(?!\nrule ).)*resources:[^\n]*gpu=1", out, re.S)
    assert re.search(r"rule prepare_preferences:(?:(?!\nrule ).)*resources:[^\n]*gpu=0", out, re.S)
    assert not (tmp_path / "results").exists()  # a dry run writes nothing


def test_null_in_configfile_removes_a_default_entry(workdir):
    override = workdir / "override.yaml"
    override.write_text("benchmarks:\n  donotanswer: null\nevaluation:\n  benchmarks: [harmbench]\n")
    proc = run_snakemake(workdir, "-n", "--configfile", str(workdir / "config.yaml"), str(override))
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["prepare_benchmark"] == 1 and counts["generate"] == 5  # base + 2 methods x 2 noise rates
    assert "donotanswer" not in proc.stdout + proc.stderr

    # without the null the default's entry stays (deep merge), and its probe texts would be unused
    override.write_text("probe:\n  data:\n    format: pku-saferlhf\n    source: {path: %s}\n"
                        % (ROOT / "tests/fixtures/pku_saferlhf.jsonl"))
    proc = run_snakemake(workdir, "-n", "--configfile", str(workdir / "config.yaml"), str(override), check=False)
    assert proc.returncode != 0
    assert "config key probe.data.unsafe: not used with probe.data.format pku-saferlhf" in proc.stdout + proc.stderr

    override.write_text(override.read_text() + "    unsafe: null\n    safe: null\n")
    run_snakemake(workdir, "-n", "--configfile", str(workdir / "config.yaml"), str(override))


def test_every_rule_takes_threads_and_resources_from_the_config():
    for smk in (ROOT / "rules").glob("*.smk"):
        for rule in re.split(r"\nrule ", smk.read_text())[1:]:
            name = rule.split(":", 1)[0]
            assert re.search(r"\n    threads: (config\[\"resources\"\]|judge_threads)", rule), f"{smk.name}: {name}"
            assert re.search(r"\n    resources:\n        \*\*(rule|judge)_resources\(", rule), f"{smk.name}: {name}"


def test_probe_data_from_pku_response_safety_labels(tmp_path):
    from workflow import probe_data
    from workflow.files import read_jsonl, write_jsonl

    fixture = ROOT / "tests/fixtures/pku_saferlhf.jsonl"
    rows = read_jsonl(fixture)
    write_jsonl(tmp_path / "bench.jsonl", [{"prompt": rows[0]["prompt"].upper() + "  "}])  # same prompt, normalised
    probe_data.main(["--spec-json", json.dumps({"format": "pku-saferlhf", "source": {"path": str(fixture)},
                                               "n_per_class": 100, "seed": 0}),
                     "--exclude", f"harmbench={tmp_path / 'bench.jsonl'}",
                     "--output", str(tmp_path / "data.jsonl"), "--report", str(tmp_path / "report.tsv")])
    out = read_jsonl(tmp_path / "data.jsonl")
    expected = {}
    for r in rows[1:]:  # the first row's prompt is a benchmark prompt: dropped with both responses
        for k in (0, 1):
            expected[f"{r['prompt']}\n\n{r[f'response_{k}']}"] = 0 if r[f"is_response_{k}_safe"] else 1
    n = min(list(expected.values()).count(0), list(expected.values()).count(1))
    assert len(out) == 2 * n and all(expected[o["text"]] == o["label"] for o in out)
    assert not any(o["text"].startswith(rows[0]["prompt"]) for o in out)
    assert "rows\tharmbench\t1\t" in (tmp_path / "report.tsv").read_text()
