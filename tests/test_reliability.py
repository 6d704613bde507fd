"""Interruption, determinism and artefact safety (issue: Reliability)."""
import glob
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, SNAKEMAKE_ENV, jobs_run, run_snakemake, snakemake_command, tiny_config, write_config
from workflow.files import atomic_path, write_text
from workflow.locks import OWNER_FILE, clear_stale_locks, record_owner


def start_and_kill(workdir: Path, marker: str, sig: int, timeout: float = 300) -> None:
    """Start the workflow, wait until a file matching ``marker`` appears, then send ``sig`` to every process."""
    proc = subprocess.Popen(snakemake_command(workdir), cwd=workdir, env=SNAKEMAKE_ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while not glob.glob(str(workdir / marker)):
            if proc.poll() is not None:
                raise AssertionError(f"workflow ended (rc {proc.returncode}) before {marker} appeared")
            if time.monotonic() > deadline:
                raise AssertionError(f"{marker} did not appear within {timeout} s")
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        proc.wait(timeout=60)


def policy_weights(workdir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.relative_to(workdir)): load_file(p)
            for p in sorted((workdir / "results/policies").rglob("model.safetensors"))}


def assert_same_results(a: Path, b: Path) -> None:
    """Bit-identical noise, probe, subspace, trained weights, answers and table."""
    for rel in ["results/data/noisy/noise0.25/seed0.jsonl", "results/probe/data.jsonl",
                "results/subspace/summary.tsv", "results/tables/harmful_rate.csv",
                "results/generations/shapo/noise0.25/seed0/harmbench.jsonl"]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for rel in ["results/probe/direction.safetensors", "results/subspace/neurons.safetensors"]:
        ta, tb = load_file(a / rel), load_file(b / rel)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), rel
    wa, wb = policy_weights(a), policy_weights(b)
    assert wa.keys() == wb.keys() and len(wa) == 4
    for rel in wa:
        assert all(torch.equal(wa[rel][k], wb[rel][k]) for k in wa[rel]), rel


def test_killed_runs_resume_without_recomputing_and_match_an_uninterrupted_run(reference_run, tmp_path,
                                                                              tiny_model_dir):
    workdir = tmp_path / "interrupted"
    workdir.mkdir()
    write_config(workdir, tiny_config(tiny_model_dir))
    # SIGTERM while the first policy trains; SIGKILL (no clean-up at all) during generation and judging
    start_and_kill(workdir, "results/logs/train_policy/*.log", signal.SIGTERM)
    base_model = workdir / "results/models/base/model.safetensors"
    assert base_model.exists()
    base_mtime = base_model.stat().st_mtime_ns
    start_and_kill(workdir, "results/logs/generate/dpo/*/*/*.log", signal.SIGKILL)
    assert list((workdir / ".snakemake/locks").glob("*.lock")), "SIGKILL should leave Snakemake's lock behind"
    start_and_kill(workdir, "results/logs/judge/*/shapo/*/*/*.log", signal.SIGKILL)
    assert not (workdir / "results/tables/harmful_rate.csv").exists()
    # no temporary file is left where an output should be, and none is taken as an output
    final = run_snakemake(workdir)
    ran = jobs_run(final)
    assert "prepare_model" not in ran and "train_probe" not in ran and "report" in ran
    assert base_model.stat().st_mtime_ns == base_mtime
    assert not [p for p in (workdir / "results").rglob("*") if p.name.endswith((".tmp",))]
    assert_same_results(reference_run[0], workdir)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out" / "table.csv"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half a ta")
            raise RuntimeError("killed")
    assert not target.exists() and list(target.parent.iterdir()) == []
    write_text(target, "complete\n")
    assert target.read_text() == "complete\n"


def test_stale_lock_of_a_dead_process_is_cleared_but_a_live_one_is_kept(tmp_path):
    locks = tmp_path / ".snakemake" / "locks"
    locks.mkdir(parents=True)
    (locks / "0.input.lock").write_text("x")
    record_owner(tmp_path / ".snakemake")  # this test process: alive
    assert clear_stale_locks(tmp_path / ".snakemake") == []
    dead = subprocess.Popen(["true"])
    dead.wait()
    owner = (tmp_path / ".snakemake" / OWNER_FILE)
    owner.write_text(owner.read_text().replace(f'"pid": {os.getpid()}', f'"pid": {dead.pid}'))
    assert clear_stale_locks(tmp_path / ".snakemake") == [str(locks / "0.input.lock")]
    assert not list(locks.iterdir())


def test_no_pickle_loading_and_no_remote_code_by_default():
    sources = {p: p.read_text() for p in (ROOT / "workflow").rglob("*.py")}
    for path, text in sources.items():
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "trust_remote_code=True" not in text, path
        assert not re.search(r"^\s*(import|from) (c?pickle|joblib)\b|pickle\.loads?\(", text, re.M), path


def test_remote_code_is_off_unless_the_config_enables_it(tiny_model_dir, tmp_path):
    from workflow import prepare_model
    from workflow.models import trusts_remote_code

    prepare_model.main(["--name-or-path", str(tiny_model_dir), "--output", str(tmp_path / "off")])
    assert not trusts_remote_code(tmp_path / "off")
    prepare_model.main(["--name-or-path", str(tiny_model_dir), "--output", str(tmp_path / "on"), "--trust-remote-code"])
    assert trusts_remote_code(tmp_path / "on")
    assert sorted(p.name for p in (tmp_path / "off").glob("*.safetensors")) == ["model.safetensors"]
    assert not list((tmp_path / "off").glob("*.bin"))


def test_atomic_dir_keeps_the_previous_folder_until_the_new_one_is_complete(tmp_path):
    from workflow.files import atomic_dir

    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("half of v2")
            raise RuntimeError("killed")
    assert (target / "weights").read_text() == "v1"
    with atomic_dir(target) as tmp:  # the next attempt clears the leftover .tmp folder
        assert list(tmp.iterdir()) == []
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2" and not (tmp_path / "model.tmp").exists()
