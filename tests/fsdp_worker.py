"""Sharded (FSDP2) training of the tiny models for tests/test_fsdp.py; also its shared definitions.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py --data DIR --out DIR

trains every variant of ``VARIANTS`` with ``training.parallel: fsdp`` through the workflow's own
``train`` (one process group for all of them), and process 0 writes each variant's log and gathered
final weights to ``--out``. Every process also records the shapes of the weight slices the ShaPO step
saved, which shows that it touched only its own rows. The test trains the same variants in one
process (DDP engine, world 1) and compares.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from workflow.lib.config import fill_defaults  # noqa: E402
from workflow.lib.files import read_jsonl  # noqa: E402
from workflow.lib.models import load_model, load_tokenizer, mlp_output_projections  # noqa: E402
from workflow.lib.parallel import exit_past_interpreter_shutdown  # noqa: E402
from workflow.lib.sharpness import SelectedNeurons, perturbed_set  # noqa: E402

TRAINING = {"batch_size": 4, "epochs": 1, "lr": 1e-3, "warmup_ratio": 0.0, "max_length": 48,
            "max_prompt_length": 24, "checkpoint_every": 0, "precision": "fp32"}
SETTINGS = fill_defaults(TRAINING, "training") | {"prompt_format": "auto"}
SEED = 1
# γ large enough on the tiny model that the raw move changes the loss at the perturbed point visibly
RAW = {"interval": 2, "perturbation": "raw", "gamma_min": 1e-2, "gamma_max": 2e-2}
DPO = {"loss": "dpo", "beta": 0.1}
# name -> (method preset, model, what the sharpness-aware step perturbs)
VARIANTS = {
    "dpo": (DPO, "llama", None),
    "drdpo": (DPO | {"dr_beta": 0.5}, "llama", None),
    # every third down_proj column (neurons along dim 1: each process holds some rows of each)
    "shapo_raw": (DPO | {"sharpness": RAW}, "llama", "neurons"),
    "shapo_normalized": (DPO | {"sharpness": {"interval": 2, "perturbation": "normalized", "rho": 0.5}}, "llama",
                         "neurons"),
    "drshapo_raw": (DPO | {"dr_beta": 0.5, "sharpness": RAW}, "llama", "neurons"),
    # every parameter, indexed along dim 0, the sharded one (embeddings included, tied to the output)
    "sam_full_raw": (DPO | {"sharpness": RAW | {"subspace": "full"}}, "llama", "full"),
    # GPT-2's Conv1D stores a neuron per row (dim 0): every third neuron, spread over both processes' rows
    "gpt2_shapo_raw": (DPO | {"sharpness": RAW}, "gpt2", "neurons"),
}
# GPT-2 at a 10x smaller lr: AdamW's first steps are ≈ lr·sign(g), so entries whose gradient is rounding
# noise (see key_bias) move by ±lr whichever way the noise falls; a smaller lr keeps that under 1e-5
LR = {"gpt2_shapo_raw": 1e-4}


def key_bias(name: str, key: str, value: torch.Tensor) -> torch.Tensor | None:
    """GPT-2's attention key bias (the middle third of c_attn.bias): its gradient is exactly zero in
    exact arithmetic (softmax ignores a shift shared by every key), so what a run does to it is AdamW's
    response to rounding noise, which differs between any two summation orders; the test leaves it out."""
    if VARIANTS[name][1] == "gpt2" and key.endswith("attn.c_attn.bias"):
        third = value.shape[0] // 3
        return torch.cat([value[:third], value[2 * third:]])
    return None


def records(n: int) -> list[dict]:
    return [{"pair_id": f"p{i}", "messages": [{"role": "user", "content": f"How do I do thing {i}?" + " x" * (i % 3)}],
             "chosen": "I can't help with that." if i % 2 else f"No. {i}",
             "rejected": f"Sure, step {i}: do it.", "flipped": i % 3 == 1}
            for i in range(n)]


def build_tiny_gpt2(folder: Path, tokenizer_dir: Path) -> Path:
    """A 2-layer GPT-2 (Conv1D MLP) with the tiny Llama's tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = load_tokenizer(tokenizer_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        initializer_range=0.3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # no dropout noise
    GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def selection(model, kind: str | None, sharpness: dict | None) -> list[SelectedNeurons] | None:
    if kind is None:
        return None
    if kind == "full":
        return perturbed_set(model, fill_defaults({"interval": 1, **sharpness}, "presets/*/sharpness"), None, SEED)
    return [SelectedNeurons(l.weight, torch.arange(0, l.n_neurons, 3), l.axis) for l in mlp_output_projections(model)]


def run_variant(name: str, data: Path, parallel):
    """(log, final weights: the whole state dict on process 0) of one variant trained under ``parallel``."""
    from workflow.train_policy import train

    method, arch, kind = VARIANTS[name]
    model_dir = data / arch
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    preset = fill_defaults(method, "presets/*")
    selected = selection(model, kind, preset.get("sharpness"))
    settings = SETTINGS | {"lr": LR.get(name, SETTINGS["lr"])}
    log = train(model, tok, read_jsonl(data / f"{arch}_pairs.jsonl"), preset, settings, SEED, selected=selected,
                parallel=parallel)
    weights = parallel.full_state_dict(model)
    return log, (model.state_dict() if weights is None else weights)


def kill_with_workers(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and the workers it started (each in a session of its own, so not its process group)."""
    workers = [int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()]
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in workers:  # gone before the resumed run starts writing the same files
        while Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower():
            time.sleep(0.01)


def kill_after_checkpoint(cmd: list[str], checkpoint: Path, step: int, env: dict, cwd: Path) -> None:
    """Start ``cmd`` (torchrun), wait until its checkpoint folder holds step ``step`` or later, then SIGKILL torchrun
    and its workers at once (a node lost)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = checkpoint / "state.json"
    deadline = time.monotonic() + 300
    try:
        while not (state.exists() and json.loads(state.read_text())["step"] >= step):
            assert proc.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
            time.sleep(0.01)
    finally:
        kill_with_workers(proc)


SHUTDOWN_PROBE = """\
import atexit, os
from pathlib import Path
here = Path(__file__).parent
rank = os.environ.get("RANK", "-")
with open(here / "started.txt", "a") as f:
    f.write(rank + "\\n")
def _at_shutdown():
    with open(here / "shut_down.txt", "a") as f:
        f.write(rank + "\\n")
atexit.register(_at_shutdown)
"""


def shutdown_probe(folder: Path, env: dict) -> dict:
    """``env`` with a ``sitecustomize`` on PYTHONPATH that records, in ``folder``, each Python process started
    (``started.txt``) and each that went through interpreter shutdown (``shut_down.txt``, by an atexit handler),
    one line per process with its RANK."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(SHUTDOWN_PROBE)
    return {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(folder), env.get("PYTHONPATH")) if p)}


def assert_workers_skipped_interpreter_shutdown(folder: Path, processes: int) -> None:
    """Every training process ended past interpreter shutdown (``exit_past_interpreter_shutdown``), where
    gloo's threads can abort a finished run; torchrun itself (RANK unset) shut down normally."""
    started = (folder / "started.txt").read_text().split()
    shut_down = (folder / "shut_down.txt").read_text().split() if (folder / "shut_down.txt").exists() else []
    assert sorted(r for r in started if r != "-") == [str(r) for r in range(processes)], started
    # the control: the probe does see a normal shutdown, torchrun's own (RANK unset)
    assert "-" in shut_down, shut_down
    workers = [r for r in shut_down if r != "-"]
    assert not workers, f"training processes that went through interpreter shutdown (RANK): {workers}"


def main(argv=None):
    import workflow.lib.train_step as train_step
    from workflow.lib.parallel import FullyShardedParallel

    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True, help="folder with the models (llama/, gpt2/) and their pairs")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    data, out = Path(a.data), Path(a.out)
    torch.set_num_threads(1)
    parallel = FullyShardedParallel(SETTINGS["precision"])
    saved_shapes: list[list[int]] = []
    perturb = train_step.perturb_selected

    def spy(selected, gamma):  # the slices the ShaPO step saves: this process's rows only
        saved = perturb(selected, gamma)
        saved_shapes.extend(list(t.shape) for t in saved)
        return saved

    train_step.perturb_selected = spy
    for name in VARIANTS:
        saved_shapes.clear()
        log, weights = run_variant(name, data, parallel)
        (out / f"{name}.rank{parallel.rank}.json").write_text(json.dumps({"saved_shapes": saved_shapes}))
        if parallel.main:
            (out / f"{name}.json").write_text(json.dumps(log))
            torch.save({k: v.clone() for k, v in weights.items()}, out / f"{name}.pt")
    parallel.close()


if __name__ == "__main__":
    main()
    exit_past_interpreter_shutdown()  # as the training stages end (workflow.lib.parallel)
