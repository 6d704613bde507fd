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
    """A randomly initialised 2-layer Llama with the embedded model's real tokenizer and chat template."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from workflow.models import embedded_gguf

    gguf_dir, gguf_file = embedded_gguf("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
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
    config["probe"]["data"].update(unsafe={"path": str(FIXTURES / "probe_unsafe.json")},
                                   safe={"path": str(FIXTURES / "probe_safe.json")}, n_per_class=12)
    config["training"].update(batch_size=4, max_length=64, max_prompt_length=32, lr=1e-3)
    config["subspace"]["percent"] = 10.0
    config["benchmarks"] = {
        "harmbench": {"source": {"path": str(FIXTURES / "harmbench.csv")}, "prompt_column": "Behavior",
                      "category_column": "SemanticCategory", "filter": {"FunctionalCategory": "standard"}},
        "donotanswer": {"source": {"path": str(FIXTURES / "risk_areas")}, "prompt_column": "prompt",
                        "category_column": "_file"},
    }
    config["evaluation"].update(benchmarks=["harmbench", "donotanswer"], n_prompts=3, max_new_tokens=8, batch_size=2)
    return config


@pytest.fixture
def workdir(tmp_path, tiny_model_dir) -> Path:
    """A fresh working directory holding a tiny config.yaml."""
    with open(tmp_path / "config.yaml", "w") as f:
        yaml.safe_dump(tiny_config(tiny_model_dir), f)
    return tmp_path


def run_snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run the real workflow with this interpreter's Snakemake, outputs under ``workdir``."""
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(workdir),
           "--configfile", str(workdir / "config.yaml"), "--cores", "2", "--profile", str(ROOT / "profiles/local"),
           *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=workdir)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def jobs_run(proc: subprocess.CompletedProcess) -> list[str]:
    """Names of the rules Snakemake executed, from its log."""
    text = proc.stdout + proc.stderr
    return [line.split()[-1].rstrip(":") for line in text.splitlines()
            if line.startswith(("rule ", "localrule ")) and line.rstrip().endswith(":")]


@pytest.fixture(scope="session")
def have_snakemake() -> None:
    if shutil.which("snakemake") is None and subprocess.run([sys.executable, "-m", "snakemake", "--version"],
                                                            capture_output=True).returncode != 0:
        pytest.fail("snakemake is not installed; run ./install.sh")
