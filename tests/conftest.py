"""Shared fixtures: a tiny random Llama built in code and a tiny workflow config on fixture data."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"


def build_tiny_llama(folder: Path, layers: int = 2, seed: int = 0) -> Path:
    """A randomly initialised 2-layer Llama with the embedded model's real tokenizer and chat template.

    ``initializer_range=0.3`` (not the usual 0.02) so that greedy decoding yields varied words
    rather than a run of newlines that decodes to an empty answer.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from workflow.models import embedded_gguf

    gguf_dir, gguf_file = embedded_gguf("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, initializer_range=0.3)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def tiny_config(model_dir: Path) -> dict:
    """The default config shrunk to the fixture data and the tiny model (absolute paths)."""
    with open(ROOT / "config.yaml") as f:
        config = yaml.safe_load(f)
    config["model"]["name_or_path"] = str(model_dir)
    config["preferences"].update(source={"path": str(FIXTURES / "hh_pairs.jsonl.gz")}, n_train=12, n_heldout=4)
    config["noise"]["rates"] = [0.0, 0.25]
    # the suite's cost must not follow the default's size: two methods, one seed (every preset is trained
    # by tests/test_reward.py's all-presets DAG test)
    config["methods"], config["seeds"] = ["dpo", "shapo"], [0]
    config["probe"]["data"].update(unsafe={"path": str(FIXTURES / "probe_unsafe.json")},
                                   safe={"path": str(FIXTURES / "probe_safe.json")}, n_per_class=12)
    # tests read the trained policies, so they stay on disk (the default deletes them once used)
    config["training"].update(batch_size=4, max_length=64, max_prompt_length=32, lr=1e-3, keep_policies=True)
    config["subspace"]["percent"] = 10.0
    config["benchmarks"] = {
        "harmbench": {"source": {"path": str(FIXTURES / "harmbench.csv")}, "prompt_column": "Behavior",
                      "category_column": "SemanticCategory", "filter": {"FunctionalCategory": "standard"}},
        "donotanswer": {"source": {"path": str(FIXTURES / "risk_areas")}, "prompt_column": "prompt",
                        "category_column": "_file"},
    }
    config["probe"]["decontaminate_against"] = ["harmbench", "donotanswer"]  # the benchmarks defined here
    config["evaluation"].update(benchmarks=["harmbench", "donotanswer"], n_prompts=3, max_new_tokens=8, batch_size=2)
    return config


@pytest.fixture
def workdir(tmp_path, tiny_model_dir) -> Path:
    """A fresh working directory holding a tiny config.yaml."""
    write_config(tmp_path, tiny_config(tiny_model_dir))
    return tmp_path


def snakemake_command(workdir: Path, *args: str) -> list[str]:
    """The real workflow, run by this interpreter's Snakemake, with outputs under ``workdir``."""
    return [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
            "--configfile", str(workdir / "config.yaml"), "--cores", "2", "--profile", str(ROOT / "profiles/local"),
            *args]


SNAKEMAKE_ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(snakemake_command(workdir, *args), capture_output=True, text=True, env=SNAKEMAKE_ENV,
                          cwd=workdir)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def jobs_run(proc: subprocess.CompletedProcess) -> list[str]:
    """Names of the rules Snakemake executed, from its log."""
    text = proc.stdout + proc.stderr
    return [line.split()[-1].rstrip(":") for line in text.splitlines()
            if line.startswith(("rule ", "localrule ")) and line.rstrip().endswith(":")]


def write_config(workdir: Path, config: dict) -> None:
    with open(workdir / "config.yaml", "w") as f:
        yaml.safe_dump(config, f)


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, tiny_model_dir):
    """One complete, uninterrupted run of the tiny workflow. Tests must not modify it: copy it first."""
    workdir = tmp_path_factory.mktemp("reference-run")
    write_config(workdir, tiny_config(tiny_model_dir))
    return workdir, run_snakemake(workdir)


def copy_run(src: Path, dst: Path) -> Path:
    """A copy of a finished run, outputs, mtimes and Snakemake metadata included."""
    shutil.copytree(src, dst, symlinks=True)
    return dst
