"""workflow/lib/checkpoint.py: a damaged checkpoint never blocks a rerun.

Each case damages one file of a real checkpoint left by a finished ``train_policy`` run, puts it where a rerun
of the same job looks for it, and reruns the job through its command line (``train_policy.main``, in this
process): the job must complete, name the damage in its output, set the folder aside (renamed, every file
kept) and end with the weights and log of an uninterrupted run. A control resumes from the intact copy, so
each damaged case is known to be read (the same inputs, the same fingerprint) rather than ignored.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from workflow import train_policy
from workflow.lib.checkpoint import Checkpointer, damaged_file, file_records, set_aside
from workflow.lib.files import write_jsonl
from workflow.lib.models import load_model, load_tokenizer
from workflow.lib.pairs import score_pairs

from test_train_policy import SETTINGS, TRAINING, records

# a ShaPO step every third step, so the resumed run must also restore the γ and batch-order RNGs
METHOD = {"loss": "dpo", "beta": 0.1, "sharpness": {"interval": 3, "subspace": "uniform", "perturbation": "raw",
                                                    "gamma_min": 1e-3, "gamma_max": 2e-3}}
STEPS, EVERY = 10, 4  # 20 pairs in batches of 2; the last checkpoint is step 8's


def job_args(data: Path, name: str, settings: dict) -> list[str]:
    return ["--model", str(data / "model"), "--pairs", str(data / "pairs.jsonl"), "--reference",
            str(data / "reference.jsonl"), "--method-json", json.dumps(METHOD), "--training-json",
            json.dumps(settings), "--prompt-format", "auto", "--seed", "3", "--threads", "1",
            "--output", str(data / name), "--train-log", str(data / f"{name}.tsv")]


def finished_with_checkpoint(data: Path, name: str, settings: dict) -> Path:
    """Run the job to its end keeping its last checkpoint (a finished job removes it; a killed one leaves it):
    the run is the uninterrupted one, its checkpoint the state a rerun would find."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Checkpointer, "remove", lambda self: None)
        train_policy.main(job_args(data, name, settings))
    folder = data / f"{name}.checkpoint"
    assert json.loads((folder / "state.json").read_text())["step"] == 8
    return folder


@pytest.fixture(scope="module")
def job_data(tiny_model_dir, tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("checkpoint")
    (data / "model").symlink_to(tiny_model_dir)
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    write_jsonl(data / "pairs.jsonl", records(2 * STEPS))
    write_jsonl(data / "reference.jsonl", score_pairs(model, tok, records(2 * STEPS), SETTINGS))
    return data


@pytest.fixture(scope="module")
def finished(job_data) -> Path:
    """The uninterrupted one-process run and its step-8 checkpoint."""
    finished_with_checkpoint(job_data, "uninterrupted", TRAINING | {"checkpoint_every": EVERY})
    return job_data


def rerun(data: Path, name: str, checkpoint: Path, settings: dict, capsys) -> str:
    """Put ``checkpoint`` where the job ``name`` looks for one, run the job, and return its output."""
    shutil.copytree(checkpoint, data / f"{name}.checkpoint")
    return rerun_in_place(data, name, settings, capsys)


def rerun_in_place(data: Path, name: str, settings: dict, capsys) -> str:
    capsys.readouterr()
    train_policy.main(job_args(data, name, settings))
    return capsys.readouterr().out


def assert_same_as_uninterrupted(data: Path, name: str, reference: str = "uninterrupted") -> None:
    a, b = load_file(data / reference / "model.safetensors"), load_file(data / name / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    log_a, log_b = (pd.read_csv(data / f"{n}.tsv", sep="\t").drop(columns="seconds") for n in (reference, name))
    pd.testing.assert_frame_equal(log_a, log_b)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def garbage(path: Path) -> None:
    """Same size, other bytes: what a crashed node can leave in blocks it never wrote."""
    path.write_bytes(bytes((i * 7 + 3) % 256 for i in range(path.stat().st_size)))


def flip_one_byte(path: Path) -> None:
    """One byte in the middle of the tensors: the file still parses, only its digest tells."""
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 0xFF
    path.write_bytes(bytes(data))


def test_an_intact_checkpoint_resumes(finished, capsys):
    """The control: the copied checkpoint is this job's (same fingerprint), so a rerun resumes from it."""
    out = rerun(finished, "intact", finished / "uninterrupted.checkpoint", TRAINING | {"checkpoint_every": EVERY},
                capsys)
    assert json.loads(next(l for l in out.splitlines() if "resumed_at_step" in l)) == {"resumed_at_step": 8,
                                                                                       "of": STEPS}
    assert "damaged" not in out and not (finished / "intact.checkpoint").exists()
    assert_same_as_uninterrupted(finished, "intact")


@pytest.mark.parametrize("damaged, damage", [("state.json", truncate), ("model.safetensors", garbage),
                                             ("model.safetensors", flip_one_byte), ("optimizer.pt", truncate)],
                         ids=["state.json-truncated", "model-garbage", "model-one-byte", "optimizer-truncated"])
@pytest.mark.workflow
def test_a_damaged_checkpoint_is_set_aside_and_the_job_completes(finished, capsys, damaged, damage):
    name = f"{damaged.split('.')[0]}-{damage.__name__}"
    checkpoint = finished / f"{name}.source"
    shutil.copytree(finished / "uninterrupted.checkpoint", checkpoint)
    damage(checkpoint / damaged)
    out = rerun(finished, name, checkpoint, TRAINING | {"checkpoint_every": EVERY}, capsys)
    assert_same_as_uninterrupted(finished, name)
    assert f"checkpoint {finished / f'{name}.checkpoint'} is damaged: {damaged}" in out, out
    assert f"as {name}.checkpoint.damaged" in out and "resumed_at_step" not in out
    # set aside, not deleted: every file as the rerun found it
    aside = finished / f"{name}.checkpoint.damaged"
    assert sorted(p.name for p in aside.iterdir()) == sorted(p.name for p in checkpoint.iterdir())
    assert (aside / damaged).read_bytes() == (checkpoint / damaged).read_bytes()


@pytest.mark.workflow
def test_sharded_checkpoint_with_a_damaged_shard_is_set_aside(job_data, capsys):
    """training.parallel fsdp in a group of one process (the sharded checkpoint's own code path: DCP shard
    files under sharded/); a damaged shard is set aside and the job ends where the uninterrupted sharded run
    did. tests/test_fsdp.py damages one shard of two processes' checkpoint."""
    settings = TRAINING | {"checkpoint_every": EVERY, "parallel": "fsdp", "devices": 1, "precision": "fp32"}
    checkpoint = finished_with_checkpoint(job_data, "sharded", settings)
    shards = sorted((checkpoint / "sharded").glob("*.distcp"))
    assert shards and (checkpoint / "sharded/.metadata").exists()
    source = job_data / "sharded.source"
    shutil.copytree(checkpoint, source)
    flip_one_byte(source / "sharded" / shards[0].name)
    out = rerun(job_data, "sharded-damaged", source, settings, capsys)
    assert_same_as_uninterrupted(job_data, "sharded-damaged", reference="sharded")
    assert f"is damaged: sharded/{shards[0].name} differs from what was written" in out, out
    assert "resumed_at_step" not in out and (job_data / "sharded-damaged.checkpoint.damaged").is_dir()


def test_damaged_file_names_the_first_file_that_differs(tmp_path):
    (tmp_path / "a").write_bytes(b"0123456789")
    (tmp_path / "b").write_bytes(b"abc")
    records = file_records(tmp_path, ["a", "b"])
    assert records["a"]["bytes"] == 10 and len(records["a"]["sha256"]) == 64
    assert damaged_file(tmp_path, records) is None
    (tmp_path / "b").write_bytes(b"abd")
    assert damaged_file(tmp_path, records) == "b differs from what was written (SHA-256)"
    (tmp_path / "a").write_bytes(b"01234")
    assert damaged_file(tmp_path, records) == "a has 5 bytes, 10 were written"
    (tmp_path / "a").unlink()
    assert damaged_file(tmp_path, records) == "a is missing"


def test_set_aside_never_overwrites_an_earlier_damaged_folder(tmp_path):
    for n in range(3):
        (tmp_path / "x.checkpoint").mkdir()
        (tmp_path / "x.checkpoint" / "state.json").write_text(str(n))
        set_aside(tmp_path / "x.checkpoint")
    aside = [tmp_path / f"x.checkpoint.{suffix}" for suffix in ("damaged", "damaged.2", "damaged.3")]
    assert [(folder / "state.json").read_text() for folder in aside] == ["0", "1", "2"]
    assert not (tmp_path / "x.checkpoint").exists()
