"""Training-loop tests on the tiny random Llama (CPU, seconds)."""
import json
import math

import pytest
import torch

from workflow.lib.config import fill_defaults
from workflow.lib.models import load_model, load_tokenizer, mlp_output_projections
from workflow.lib.pairs import collate_pairs, encode_response_pair, sequence_logps, text_key
from workflow.lib.pairs import score_pairs
from workflow.lib.sharpness import SelectedNeurons, perturbed_set
from workflow.train_policy import attach_reference, train
from workflow.lib.train_step import NonFiniteLoss

TRAINING = {"batch_size": 2, "epochs": 1, "lr": 1e-3, "warmup_ratio": 0.0, "max_length": 48, "max_prompt_length": 24}
SETTINGS = fill_defaults(TRAINING, "training") | {"prompt_format": "auto"}


def preset(**method):
    """A method preset with the schema's defaults filled in, as the rule passes it."""
    return fill_defaults(method, "presets/*")


DPO = preset(loss="dpo", beta=0.1)


def records(n=4):
    return [{"pair_id": f"p{i}", "messages": [{"role": "user", "content": f"How do I do thing {i}?"}],
             "chosen": "I can't help with that.", "rejected": f"Sure, step {i}: do it.", "flipped": i % 2 == 1}
            for i in range(n)]


@pytest.fixture
def tiny(tiny_model_dir):
    torch.manual_seed(0)
    return load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)


def test_sequence_logps_sums_answer_token_logprobs(tiny):
    model, tok = tiny
    enc = [encode_response_pair(tok, r, 48, 24) for r in records(2)]
    batch = collate_pairs(enc, tok.pad_token_id)
    got = sequence_logps(model, batch)
    # reference computation, one sequence at a time without padding
    for i, e in enumerate(enc + enc):
        side = "chosen" if i < 2 else "rejected"
        ids = torch.tensor([e["prompt"] + e[side]])
        logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        n_prompt = len(e["prompt"])
        want = sum(logp[t - 1, ids[0, t]] for t in range(n_prompt, ids.shape[1]))
        assert torch.allclose(got[i], want, atol=1e-4)


def test_encoding_truncates_prompt_from_the_left_and_keeps_eos(tiny):
    _, tok = tiny
    long = {"messages": [{"role": "user", "content": "word " * 100}], "chosen": "yes " * 100, "rejected": "no"}
    e = encode_response_pair(tok, long, max_length=40, max_prompt_length=16)
    assert len(e["prompt"]) == 16 and e["truncated"]
    assert len(e["prompt"]) + len(e["chosen"]) == 40
    assert e["rejected"][-1] == tok.eos_token_id


def with_reference(model, tok, recs):
    attach_reference(recs, score_pairs(model, tok, recs, SETTINGS), "reference")
    return recs


def test_dpo_training_logs_clean_and_flipped_accuracy(tiny):
    model, tok = tiny
    log = train(model, tok, with_reference(model, tok, records()), DPO, SETTINGS, seed=0)
    assert len(log) == 2
    assert all(r["n_clean"] + r["n_flipped"] == 2 for r in log)
    assert not any(r["sharpness_step"] for r in log)
    assert abs(log[0]["loss"] - 0.6931) < 1e-3  # policy == reference at step 1


@pytest.mark.workflow
def test_shapo_step_uses_gradients_at_the_perturbed_point(tiny_model_dir):
    recs = records()

    def run(method):
        torch.manual_seed(0)
        model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
        layers = mlp_output_projections(model)
        selected = [SelectedNeurons(l.weight, torch.tensor([0, 3]), l.axis) for l in layers]
        log = train(model, tok, with_reference(model, tok, [dict(r) for r in recs]), method, SETTINGS, 0, selected=selected)
        return model, log

    plain, _ = run(DPO)
    big = preset(loss="dpo", beta=0.1, sharpness={"interval": 1, "gamma_min": 50.0, "gamma_max": 50.0})
    sharp, log = run(big)
    assert all(r["sharpness_step"] and r["gamma"] == 50.0 for r in log)
    assert log[0]["loss_perturbed"] != log[0]["loss"]
    # the optimizer stepped from the unperturbed weights, but with different gradients
    diff = [not torch.equal(a, b) for a, b in zip(plain.parameters(), sharp.parameters())]
    assert any(diff)
    every_other = preset(loss="dpo", beta=0.1, sharpness={"interval": 2, "gamma_min": 1e-6, "gamma_max": 2e-6})
    _, log = run(every_other)
    assert [r["sharpness_step"] for r in log] == [False, True]


def test_shapo_step_applies_exactly_the_gradient_at_theta_plus_gamma_g_on_the_selected_columns(tiny_model_dir):
    """The optimizer's gradient of a sharpness-aware step is ∇L(θ + γ·g_S), computed here by hand:
    g = ∇L(θ), the selected columns of every down_proj moved by γ·g, the whole gradient taken again
    there. With SGD at lr 1 and no clipping, the step is θ' = θ − ∇L(θ + γ·g_S) exactly."""
    import random

    from workflow.lib.parallel import DataParallel
    from workflow.lib.train_step import Trainer, train_step

    torch.manual_seed(0)
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    recs = with_reference(model, tok, records(2))
    batch = collate_pairs([encode_response_pair(tok, r, 48, 24) for r in recs], tok.pad_token_id)
    gamma, beta, columns = 0.5, 0.1, torch.tensor([1, 4, 9])
    ref = torch.tensor([[r["ref_chosen"] for r in recs], [r["ref_rejected"] for r in recs]])
    names = [n for n, _ in model.named_parameters()]

    class At:  # the model evaluated at other parameter values
        def __init__(self, params):
            self.params = params

        def parameters(self):
            return iter(self.params.values())

        def __call__(self, **inputs):
            return torch.func.functional_call(model, self.params, (), inputs)

    def loss_at(params: dict) -> torch.Tensor:  # DPO loss written out, independent of workflow.lib.losses
        logps = sequence_logps(At(params), batch)
        h = (logps[:2] - ref[0]) - (logps[2:] - ref[1])
        return -torch.nn.functional.logsigmoid(beta * h).mean()

    theta = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    g = dict(zip(names, torch.autograd.grad(loss_at(theta), list(theta.values()))))
    moved = {n: t.detach().clone() for n, t in theta.items()}
    down = [n for n in names if n.endswith("mlp.down_proj.weight")]
    for n in down:
        moved[n][:, columns] += gamma * g[n][:, columns]
    moved = {n: t.requires_grad_(True) for n, t in moved.items()}
    g_perturbed = dict(zip(names, torch.autograd.grad(loss_at(moved), list(moved.values()))))
    expected = {n: theta[n].detach() - g_perturbed[n] for n in names}

    method = preset(loss="dpo", beta=beta, sharpness={"interval": 1, "gamma_min": gamma, "gamma_max": gamma})
    selected = [SelectedNeurons(l.weight, columns, l.axis) for l in mlp_output_projections(model)]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    parallel = DataParallel("fp32")
    trainer = Trainer(model, model, optimizer, scheduler, method, SETTINGS | {"max_grad_norm": 1e9}, parallel,
                      selected, random.Random(0))
    row = train_step(trainer, batch, recs, recs, step=1)
    assert row["sharpness_step"] and row["gamma"] == gamma
    assert row["loss_perturbed"] == pytest.approx(loss_at(moved).item(), abs=1e-6)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], atol=1e-6, rtol=0, msg=n)
    # the plain gradient would have given another step on the moved columns
    assert not torch.allclose(g[down[0]][:, columns], g_perturbed[down[0]][:, columns], atol=1e-6)
    # the step's diagnostics, from the gradients computed by hand
    g_s = torch.cat([g[n][:, columns].flatten() for n in down]).double()
    assert row["grad_norm_moved"] == pytest.approx(float(g_s.norm()), rel=1e-5)
    assert row["move_norm"] == pytest.approx(gamma * float(g_s.norm()), rel=1e-5)
    w_s = torch.cat([theta[n].detach()[:, columns].flatten() for n in down]).double()
    assert row["move_relative"] == pytest.approx(gamma * float(g_s.norm() / w_s.norm()), rel=1e-5)
    assert row["effective_fraction"] == 1.0  # γ = 0.5: every moved fp32 value changes
    a = torch.cat([g[n].flatten() for n in names]).double()
    b = torch.cat([g_perturbed[n].flatten() for n in names]).double()
    assert row["grad_norm_at_theta"] == pytest.approx(float(a.norm()), rel=1e-5)
    assert row["grad_cosine"] == pytest.approx(float(a @ b / (a.norm() * b.norm())), abs=1e-6)
    assert row["grad_cosine"] < 1 - 1e-6  # a step this large turns the gradient
    assert row["grad_norm_change"] == pytest.approx(float(b.norm() / a.norm() - 1), abs=1e-5)


def test_non_finite_loss_names_step_and_pairs(tiny):
    model, tok = tiny
    recs = with_reference(model, tok, records())
    recs[0]["ref_chosen"] = float("nan")
    with pytest.raises(NonFiniteLoss, match=r"at step 1, pairs: p\d, p\d"):
        train(model, tok, recs, DPO, SETTINGS, seed=0)


def test_reference_is_looked_up_by_answer_text_so_flips_need_no_flag(tiny):
    model, tok = tiny
    recs = records(2)
    reference = score_pairs(model, tok, recs, SETTINGS)
    flipped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in recs]
    attach_reference(flipped, reference, "reference")
    assert flipped[0]["ref_chosen"] == reference[0]["logps"][text_key(recs[0]["rejected"])]
    with pytest.raises(ValueError, match="no reference log-probs for pair 'p0'"):
        attach_reference([{**recs[0], "chosen": "something else"}], reference, "reference.jsonl")


@pytest.mark.parametrize("subspace", ["probe", "random", "uniform", "full"])
def test_geometry_controls_choose_what_is_perturbed(tiny_model_dir, tmp_path, subspace):
    from safetensors.torch import save_file

    model = load_model(tiny_model_dir)
    layers = mlp_output_projections(model)
    path = tmp_path / "neurons.safetensors"
    save_file({"layer0.index": torch.tensor([1, 2]), "layer1.index": torch.tensor([5])}, str(path),
              metadata={"names": json.dumps([l.name for l in layers])})
    chosen = perturbed_set(model, preset(loss="dpo", beta=0.1, sharpness={"interval": 1, "subspace": subspace})[
        "sharpness"], str(path), seed=0)
    count = sum(len(s.index) for s in chosen)
    if subspace == "probe":
        assert [s.index.tolist() for s in chosen] == [[1, 2], [5]]
    elif subspace == "random":
        assert count == 3  # as many neurons as the probe selected
        again = perturbed_set(model, {"subspace": subspace}, str(path), seed=0)  # only the kind matters here
        assert [s.index.tolist() for s in again] == [s.index.tolist() for s in chosen]
    elif subspace == "uniform":
        assert count == sum(l.n_neurons for l in layers)
    else:
        assert {id(s.weight) for s in chosen} == {id(p) for p in model.parameters()}


@pytest.mark.parametrize("method", [
    {"loss": "cdpo", "beta": 0.1, "label_smoothing": 0.1},
    {"loss": "rdpo", "beta": 0.1, "label_smoothing": 0.2},
    {"loss": "ipo", "beta": 0.5},
    {"loss": "simpo", "beta": 2.0, "simpo_margin": 0.5},
    {"loss": "dpo", "beta": 0.1, "dr_beta": 1.0},
    {"loss": "dpo", "beta": 0.1, "dr_beta": 1.0,
     "sharpness": {"interval": 1, "subspace": "full", "perturbation": "normalized", "rho": 0.05}},
])
def test_every_loss_and_control_trains(tiny_model_dir, method):
    method = preset(**method)
    torch.manual_seed(0)
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    before = [p.detach().clone() for p in model.parameters()]
    selected = perturbed_set(model, method["sharpness"], None, 0) if "sharpness" in method else None
    log = train(model, tok, with_reference(model, tok, records()), method, SETTINGS, 0, selected=selected)
    assert all(math.isfinite(r["loss"]) for r in log)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.workflow
def test_killed_training_resumes_from_its_checkpoint_with_identical_final_weights(tiny_model_dir, tmp_path, capsys):
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    from conftest import ROOT
    from workflow import train_policy
    from workflow.lib.files import write_jsonl

    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    recs = records(80)
    write_jsonl(tmp_path / "pairs.jsonl", recs)
    write_jsonl(tmp_path / "reference.jsonl", score_pairs(model, tok, recs, SETTINGS))
    method = {**DPO, "sharpness": {"interval": 3, "subspace": "uniform", "perturbation": "raw",
                                   "gamma_min": 1e-3, "gamma_max": 2e-3}}
    settings = {**TRAINING, "checkpoint_every": 2, "warmup_ratio": 0.1}

    def args(name):
        return ["--model", str(tiny_model_dir), "--pairs", str(tmp_path / "pairs.jsonl"),
                "--reference", str(tmp_path / "reference.jsonl"), "--method-json", json.dumps(method),
                "--training-json", json.dumps(settings), "--prompt-format", "auto", "--seed", "3", "--threads", "1",
                "--output", str(tmp_path / name), "--log", str(tmp_path / f"{name}.tsv")]

    train_policy.main(args("uninterrupted"))
    assert not (tmp_path / "uninterrupted.checkpoint").exists()  # removed after success

    proc = subprocess.Popen([sys.executable, "-m", "workflow.train_policy", *args("killed")], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "killed.checkpoint" / "state.json"
    deadline = time.monotonic() + 120
    while not (state.exists() and json.loads(state.read_text())["step"] >= 6):
        assert proc.poll() is None and time.monotonic() < deadline, "training ended before it could be killed"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed").exists()

    capsys.readouterr()
    train_policy.main(args("killed"))
    resumed = json.loads(next(l for l in capsys.readouterr().out.splitlines() if "resumed_at_step" in l))
    assert 6 <= resumed["resumed_at_step"] < resumed["of"] == 40
    a, b = load_file(tmp_path / "uninterrupted/model.safetensors"), load_file(tmp_path / "killed/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log_a = (tmp_path / "uninterrupted.tsv").read_text().splitlines()
    log_b = (tmp_path / "killed.tsv").read_text().splitlines()
    drop_seconds = [[c for i, c in enumerate(l.split("\t")) if i != log_a[0].split("\t").index("seconds")] for l in log_a]
    assert drop_seconds == [[c for i, c in enumerate(l.split("\t")) if i != log_a[0].split("\t").index("seconds")]
                            for l in log_b]


def test_checkpoint_of_other_inputs_is_ignored(tiny_model_dir, tmp_path):
    from workflow.lib.checkpoint import Checkpointer

    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    recs = with_reference(model, tok, records(8))
    settings = {**SETTINGS, "checkpoint_every": 1}
    train(model, tok, recs, DPO, settings, seed=0, checkpointer=Checkpointer(tmp_path / "ckpt", 1, "key-a"))
    assert (tmp_path / "ckpt" / "state.json").exists()
    fresh = load_model(tiny_model_dir)
    log = train(fresh, tok, recs, DPO, settings, seed=0, checkpointer=Checkpointer(tmp_path / "ckpt", 1, "key-b"))
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # started over instead of resuming at step 3


def test_reward_level_shapo_trains_with_soft_labels(tiny_model_dir):
    torch.manual_seed(0)
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    recs = with_reference(model, tok, records())
    for r, p in zip(recs, (0.9, 0.2, 0.7, 0.4)):
        r["soft_label"] = p
    method = preset(loss="dpo", beta=0.1, dr_beta=1.0, reward_labels={"beta_r": 1.0},
                    sharpness={"interval": 1, "subspace": "uniform", "perturbation": "raw", "gamma_min": 1e-3,
                               "gamma_max": 1e-3})
    log = train(model, tok, recs, method, SETTINGS, 0, selected=perturbed_set(model, method["sharpness"], None, 0))
    assert abs(log[0]["loss"] - math.log(2)) < 1e-3  # h = 0 at step 1: cross-entropy log 2 whatever p
    assert all(r["sharpness_step"] and math.isfinite(r["loss_perturbed"]) for r in log)


def test_every_preset_trains_in_the_dag(reference_run, tmp_path, monkeypatch):
    """Every preset of config.yaml through the real Snakemake DAG on the tiny model (one noise rate, one seed),
    on a copy of the reference run (its model, noisy pairs, probe and subspace). Snakemake runs every job up to
    the policies (the reward stage and its figure, the reference log-probs); each policy's job is then the exact
    command Snakemake plans for it (its dry run), run in this process: 14 trainings without 14 Python start-ups."""
    import contextlib
    import shlex

    import numpy as np
    import pandas as pd
    import yaml

    from conftest import copy_run, jobs_run, run_snakemake, write_config
    from test_reward_model import check_reward_outputs

    workdir = copy_run(reference_run[0], tmp_path / "run")
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    presets = sorted(config["presets"])
    assert {"dpo", "shapo", "shapo_reward", "dpo_reward", "drdpo", "drshapo", "shapo_random", "shapo_uniform"} <= set(presets)
    config["methods"], config["noise"]["rates"], config["seeds"] = presets, [0.25], [0]
    config["training"]["batch_size"] = 2  # 6 steps: every sharpness preset (interval 5) takes a sharpness-aware step
    write_config(workdir, config)
    targets = [f"results/policies/{m}/noise0.25/seed0" for m in presets]
    figures = ["results/figures/reward_soft_labels.png", "results/figures/reward_soft_labels.pdf"]
    upstream = run_snakemake(workdir, *targets, *figures, "--omit-from", "train_policy")
    assert not {"prepare_model", "train_probe", "select_subspace", "inject_noise", "train_policy"} & set(jobs_run(upstream))
    plan = run_snakemake(workdir, *targets, "--dry-run", "--printshellcmds")
    assert sorted(jobs_run(plan)) == ["train_policy"] * len(presets)
    commands = [line.strip().removeprefix("Shell command: ") for line in (plan.stdout + plan.stderr).splitlines()
                if line.strip().removeprefix("Shell command: ").startswith("python -m workflow.train_policy ")]
    assert len(commands) == len(presets)

    from workflow import train_policy
    monkeypatch.chdir(workdir)
    for command in commands:
        words = shlex.split(command)
        argv, log = words[3:words.index(">")], words[words.index(">") + 1]  # "... > {log} 2>&1", as the shell would
        with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            train_policy.main(argv)
    for m in presets:
        folder = workdir / f"results/policies/{m}/noise0.25/seed0"
        assert (folder / "model.safetensors").exists(), m
        log = pd.read_csv(f"{folder}.train_log.tsv", sep="\t")
        assert len(log) == 6 and np.isfinite(log["loss"]).all(), m
        sharp = config["presets"][m].get("sharpness")
        assert log["sharpness_step"].tolist() == [bool(sharp) and s % sharp["interval"] == 0 for s in log["step"]], m
        trained = json.loads((folder / "training_config.json").read_text())["method"]
        assert all(trained[k] == v for k, v in config["presets"][m].items() if k != "sharpness"), m
        assert bool(sharp) == ("sharpness" in trained), m  # the preset (plus the schema's defaults) reached the job
    check_reward_outputs(workdir)  # reward-level presets: the reward model and the soft-label figure


def test_lora_shapo_perturbs_the_frozen_base_columns_and_saves_a_merged_model(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from workflow import train_policy
    from workflow.lib.files import write_jsonl
    from workflow.lib.pairs import score_pairs

    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    recs = records()
    write_jsonl(tmp_path / "pairs.jsonl", recs)
    write_jsonl(tmp_path / "reference.jsonl", score_pairs(model, tok, recs, SETTINGS))
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    method = {"loss": "dpo", "beta": 0.1, "sharpness": {"interval": 1, "subspace": "uniform", "perturbation": "raw",
                                                        "gamma_min": 1e-2, "gamma_max": 1e-2}}
    train_policy.main(["--model", str(tiny_model_dir), "--pairs", str(tmp_path / "pairs.jsonl"),
                       "--reference", str(tmp_path / "reference.jsonl"), "--method-json", json.dumps(method),
                       "--training-json", json.dumps(TRAINING | {"lora": lora, "checkpoint_every": 0}),
                       "--prompt-format", "auto", "--seed", "0", "--output", str(tmp_path / "policy"), "--log", str(tmp_path / "log.tsv")])
    import pandas as pd

    log = pd.read_csv(tmp_path / "log.tsv", sep="\t")
    assert log["sharpness_step"].all() and (log["loss_perturbed"] != log["loss"]).all()  # the base columns moved
    base = load_file(tiny_model_dir / "model.safetensors")
    merged = load_file(tmp_path / "policy" / "model.safetensors")
    assert merged.keys() == base.keys()  # an ordinary model, adapters merged
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    # only the adapted projections differ: down_proj, perturbed at every step, was restored bit-exactly
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def test_tensorboard_gets_the_training_curves(tiny, tmp_path):
    """training.report_to: tensorboard writes every step's loss, margin and accuracies, and ΔL of each
    sharpness-aware step, as TensorBoard scalars beside the TSV log."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    model, tok = tiny
    method = preset(loss="dpo", beta=0.1, sharpness={"interval": 2, "subspace": "uniform", "gamma_min": 1e-2,
                                                     "gamma_max": 1e-2})
    recs = with_reference(model, tok, records(8))
    log = train(model, tok, recs, method, SETTINGS, 0, selected=perturbed_set(model, method["sharpness"], None, 0),
                tensorboard_dir=str(tmp_path / "tb"))
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in log], rel=1e-6)
    assert {"train/margin", "train/acc_clean", "train/acc_flipped", "sharpness/delta_loss"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("sharpness/delta_loss")] == [2, 4]
