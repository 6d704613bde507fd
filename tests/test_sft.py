"""Optional SFT stage: the loss masks the prompt, and with sft.enabled the DAG trains policies from the SFT model."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from conftest import jobs_run, run_snakemake, write_config, tiny_config
from workflow.files import read_jsonl
from workflow.sft import collate_sft


def test_collate_sft_scores_only_answer_tokens():
    batch = collate_sft([{"prompt": [5, 6, 7], "answer": [8, 9]}, {"prompt": [5], "answer": [3]}], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 3, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9], [-100, 3, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]


def test_sft_enabled_trains_policies_from_the_sft_model(tmp_path, tiny_model_dir):
    config = tiny_config(tiny_model_dir)
    config["sft"] = {"enabled": True, "epochs": 1, "lr": 1e-3, "batch_size": 4}
    write_config(tmp_path, config)
    proc = run_snakemake(tmp_path, "results/policies/dpo/noise0/seed0")
    assert sorted(set(jobs_run(proc))) == sorted(
        {"prepare_model", "prepare_preferences", "sft", "reference_logps", "inject_noise", "train_policy"})

    sft_dir, base_dir = tmp_path / "results/models/sft", tmp_path / "results/models/base"
    log = (tmp_path / "results/models/sft.train_log.tsv").read_text().splitlines()
    assert len(log) == 1 + 3  # header + ceil(12 pairs / 4) steps
    sft_weights, base_weights = load_file(sft_dir / "model.safetensors"), load_file(base_dir / "model.safetensors")
    assert any(not torch.equal(sft_weights[k], base_weights[k]) for k in base_weights)  # SFT moved the weights
    training = json.loads((tmp_path / "results/policies/dpo/noise0/seed0/training_config.json").read_text())
    assert training["base_model"] == "results/models/sft"
    assert read_jsonl(tmp_path / "results/data/preferences/reference_logps.jsonl")
    assert "--model results/models/sft " in (proc.stdout + proc.stderr).split("rule reference_logps:", 1)[1]

