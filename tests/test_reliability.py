"""Interruption, determinism and artefact safety (issue: Reliability)."""
import glob
import hashlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, SNAKEMAKE_ENV, job_blocks, jobs_run, run_snakemake, snakemake_command, tiny_config, write_config
from workflow.lib.files import atomic_path, write_text
from workflow.lib.locks import OWNER_FILE, clear_stale_locks, record_owner


# The interrupted runs build both noise-0.25 policies and their HarmBench judgements: every kind of stage (data,
# probe, subspace, reference, training, generation, judging) on the part of the DAG that label noise and ShaPO
# touch, in a third of the reference run's jobs.
TARGETS = [f"results/judgements/refusal_markers/{m}/noise0.25/seed0/harmbench.json" for m in ("dpo", "shapo")]


def start_and_kill(workdir: Path, marker: str, sig: int, log: Path, timeout: float = 3600) -> list[str]:
    """Start the whole workflow (its output to ``log``), wait until a job whose log matches ``marker`` has
    started, then send ``sig`` to every process of the run: Snakemake and its jobs. Returns the matching logs.

    The marker must name a job no earlier run started (checked): a log left by an earlier run would match at
    once and the kill would land before Snakemake even started. ``timeout`` only guards against a hang (the
    loop ends as soon as the run does): on a loaded machine a run takes minutes to reach a marker (301.6 s
    measured at load 12.6 on 2 cores, past the 300 s this test once allowed).
    """
    assert not glob.glob(str(workdir / marker)), f"{marker} exists before the run: it cannot mark where this run is"
    with open(log, "w") as out:
        proc = subprocess.Popen(snakemake_command(workdir, *TARGETS), cwd=workdir, env=SNAKEMAKE_ENV,
                                start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        try:
            while not (found := glob.glob(str(workdir / marker))):
                if proc.poll() is not None:
                    raise AssertionError(f"workflow ended (rc {proc.returncode}) before {marker} appeared:\n"
                                         + log.read_text()[-3000:])
                if time.monotonic() > deadline:
                    raise AssertionError(f"{marker} did not appear within {timeout} s")
                time.sleep(0.1)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, sig)
            proc.wait(timeout=600)  # a SIGTERM lets Snakemake clean up first
    return sorted(os.path.relpath(f, workdir) for f in found)


def killed_job_inputs(log: Path, job_logs: list[str]) -> list[str]:
    """Input files and folders of the jobs whose logs are ``job_logs`` (the jobs a kill landed in)."""
    blocks = [b for b in job_blocks(log.read_text()) if b.get("log") in job_logs]
    assert len(blocks) == len(job_logs), f"no job block for {job_logs} in {log}"
    return sorted({p for b in blocks for p in b["input"].split(", ")})


def fingerprints(workdir: Path, paths: list[str]) -> dict[str, tuple[int, str]]:
    """(mtime in ns, sha256) of every file of ``paths`` (a folder: every file inside it)."""
    files = [f for p in paths for f in ([workdir / p] if (workdir / p).is_file() else sorted((workdir / p).rglob("*")))
             if f.is_file()]
    return {str(f.relative_to(workdir)): (f.stat().st_mtime_ns, hashlib.sha256(f.read_bytes()).hexdigest())
            for f in files}


# Why Snakemake may rerun a job of an interrupted run: its output is missing, it was marked incomplete
# (rerun-incomplete: "Forced execution"), or an input was rebuilt by this run. An "Updated input files"
# (mtime), params, code or input-set reason would mean the resume itself changed something.
RESUME_REASONS = ("Missing output files", "Forced execution", "Input files updated by another job")


def policy_weights(workdir: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {str(p.relative_to(workdir)): load_file(p)
            for p in sorted((workdir / "results/policies").rglob("model.safetensors"))}


def assert_same_results(a: Path, b: Path) -> None:
    """Bit-identical noise, probe, subspace, trained weights, answers and judgements (``b``: the targets' DAG)."""
    for rel in ["results/data/noisy/noise0.25/seed0.jsonl", "results/probe/data.jsonl", "results/subspace/summary.tsv",
                *[f"results/generations/{m}/noise0.25/seed0/harmbench.jsonl" for m in ("dpo", "shapo")],
                *[t.replace(".json", ".jsonl") for t in TARGETS]]:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    for rel in ["results/probe/direction.safetensors", "results/subspace/neurons.safetensors"]:
        ta, tb = load_file(a / rel), load_file(b / rel)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), rel
    wa, wb = policy_weights(a), policy_weights(b)
    assert len(wa) == 4 and len(wb) == 2 and set(wb) <= set(wa)
    for rel in wb:
        assert all(torch.equal(wa[rel][k], wb[rel][k]) for k in wa[rel]), rel


def test_killed_runs_resume_without_recomputing_and_match_an_uninterrupted_run(reference_build, tmp_path,
                                                                              tiny_model_dir):
    """Three real runs (of TARGETS) killed at points fixed by the DAG, not by the scheduler's order (which varies
    from run to run): each kill lands in a job no earlier run reached, so every input of that job is finished, and
    none of them (nor, through them, anything upstream) may be recomputed by the runs that follow. The resumed
    run's results equal the reference run's, built meanwhile from scratch without interruption."""
    workdir = tmp_path / "interrupted"
    workdir.mkdir()
    write_config(workdir, tiny_config(tiny_model_dir))
    locks = workdir / ".snakemake/locks"
    kept = {}  # every file a killed job read, as it was at the kill

    def kill(marker: str, sig: int, name: str) -> list[str]:
        log = tmp_path / f"{name}.log"
        inputs = killed_job_inputs(log, start_and_kill(workdir, marker, sig, log))
        kept.update(fingerprints(workdir, inputs))
        return inputs

    # SIGTERM while the first policy trains: Snakemake stops its jobs, removes their outputs and its lock
    assert "results/models/base" in kill("results/logs/train_policy/*.log", signal.SIGTERM, "1-sigterm-training")
    assert not list(locks.glob("*.lock")), "a SIGTERM should stop Snakemake cleanly"
    # SIGKILL (no clean-up at all) while the first trained policy answers: no run has generated with one before
    assert any(p.startswith("results/policies/") for p in
               kill("results/logs/generate/*/*/*/*.log", signal.SIGKILL, "2-sigkill-generation"))
    assert list(locks.glob("*.lock")), "SIGKILL should leave Snakemake's lock behind"
    # SIGKILL while a ShaPO policy's answers are judged: no run has judged a policy's answers before, and
    # ShaPO was trained on the finished probe and subspace
    assert any(p.startswith("results/generations/shapo/") for p in
               kill("results/logs/judge/*/shapo/*/*/*.log", signal.SIGKILL, "3-sigkill-judging"))
    assert not all((workdir / t).exists() for t in TARGETS)
    final = run_snakemake(workdir, *TARGETS)
    text = final.stdout + final.stderr
    (tmp_path / "4-final.log").write_text(text)
    ran = jobs_run(final)
    assert "prepare_model" not in ran and "train_probe" not in ran and "judge" in ran
    for job in job_blocks(text):
        assert all(part.startswith(RESUME_REASONS) for part in job["reason"].split("; ")), (job["rule"], job["reason"])
    # nothing a killed job had read was rewritten (were anything upstream rerun, it would have been)
    assert {p for p, stamp in kept.items() if fingerprints(workdir, [p]).get(p) != stamp} == set()
    # no temporary file is left where an output should be, and none is taken as an output
    assert not [p for p in (workdir / "results").rglob("*") if p.name.endswith((".tmp",))]
    assert_same_results(reference_build.result()[0], workdir)  # the uninterrupted run, built meanwhile


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
    from workflow.lib.models import trusts_remote_code

    prepare_model.main(["--name-or-path", str(tiny_model_dir), "--output", str(tmp_path / "off")])
    assert not trusts_remote_code(tmp_path / "off")
    prepare_model.main(["--name-or-path", str(tiny_model_dir), "--output", str(tmp_path / "on"), "--trust-remote-code"])
    assert trusts_remote_code(tmp_path / "on")
    assert sorted(p.name for p in (tmp_path / "off").glob("*.safetensors")) == ["model.safetensors"]
    assert not list((tmp_path / "off").glob("*.bin"))


def test_atomic_dir_keeps_the_previous_folder_until_the_new_one_is_complete(tmp_path):
    from workflow.lib.files import atomic_dir

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


def test_atomic_writes_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """A node that crashes just after a job must not leave an empty file under the final name: the data are
    fsynced before the rename, the folder holding the new name after it. The real calls are made, and recorded
    (fsync by the path its descriptor is open on)."""
    from workflow.lib.files import atomic_dir

    events = []
    fsync, replace, rename = os.fsync, os.replace, Path.rename

    def spy_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def spy_replace(src, dst):
        events.append(("rename", str(src), str(dst)))
        replace(src, dst)

    def spy_rename(self, target):
        events.append(("rename", str(self), str(target)))
        return rename(self, target)

    monkeypatch.setattr(os, "fsync", spy_fsync)
    monkeypatch.setattr(os, "replace", spy_replace)
    monkeypatch.setattr(Path, "rename", spy_rename)
    out = tmp_path / "out"
    write_text(out / "table.csv", "complete\n")
    staged = str(out / ".table.csv.tmp")
    assert events == [("fsync", staged), ("rename", staged, str(out / "table.csv")), ("fsync", str(out))]

    events.clear()
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "shards").mkdir()
        (tmp / "shards" / "0.bin").write_bytes(b"w")
        (tmp / "config.json").write_text("{}")
    staged, final = tmp_path / "model.tmp", tmp_path / "model"
    *synced, renamed, parent = events
    assert sorted(synced) == sorted(("fsync", str(p)) for p in (staged / "shards/0.bin", staged / "config.json",
                                                                 staged / "shards", staged))
    assert synced.index(("fsync", str(staged / "shards/0.bin"))) < synced.index(("fsync", str(staged / "shards")))
    assert synced[-1] == ("fsync", str(staged))  # the folder after its entries
    assert renamed == ("rename", str(staged), str(final)) and parent == ("fsync", str(tmp_path))
