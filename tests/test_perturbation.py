"""Is the sharpness-aware step effective? Its diagnostics by hand, matched controls, inert vs effective on a tiny
model, and the per-method summary the report prints."""
import math
import random

import pandas as pd
import pytest
import torch

from workflow.lib.config import ConfigError, fill_defaults
from workflow.lib.checks import check_presets
from workflow.lib.presets import reads_subspace
from workflow.perturbation import base_method, is_inert, summarise
from workflow.lib.sharpness import (SelectedNeurons, gradient_change, measure_move, perturb_selected, restore_selected,
                                selected_grad_norm, step_size)


def preset(**method):
    return fill_defaults(method, "presets/*")


# ------------------------------------------------------------------------------------- the diagnostics by hand
def test_move_norm_is_gamma_times_the_gradient_norm_and_relative_to_the_moved_weights():
    g = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 10, generator=g))
    w.grad = torch.randn(6, 10, generator=g)
    idx = torch.tensor([1, 4, 7])
    selected = [SelectedNeurons(w, idx, axis=1)]
    gamma = 0.25
    saved = perturb_selected(selected, gamma)
    got = measure_move(selected, saved, gamma, torch.float32)
    grad_norm = w.grad[:, idx].double().norm().item()
    assert got["grad_norm_moved"] == pytest.approx(grad_norm, rel=1e-7)
    assert got["move_norm"] == pytest.approx(gamma * grad_norm, rel=1e-7)
    assert got["move_relative"] == pytest.approx(gamma * grad_norm / saved[0].double().norm().item(), rel=1e-7)
    assert got["effective_fraction"] == 1.0  # a move of ~0.25 changes every fp32 value
    restore_selected(selected, saved)


def test_effective_fraction_counts_values_changed_in_the_compute_precision():
    """bf16 has 8 significant bits: at 1.0 its spacing is 2^-7 ≈ 0.0078. A move of 0.01 changes the bf16 value,
    a move of 1e-5 rounds back to it (but changes the fp32 value)."""
    w = torch.nn.Parameter(torch.ones(4, 6))
    w.grad = torch.zeros(4, 6)
    w.grad[:, 0] = 1.0    # moved by γ·1 = 0.01
    w.grad[:, 1] = 1e-3   # moved by 1e-5
    selected = [SelectedNeurons(w, torch.tensor([0, 1]), axis=1)]
    saved = perturb_selected(selected, 0.01)
    assert measure_move(selected, saved, 0.01, torch.bfloat16)["effective_fraction"] == 0.5
    assert measure_move(selected, saved, 0.01, torch.float32)["effective_fraction"] == 1.0
    restore_selected(selected, saved)
    again = perturb_selected(selected, 1e-9)  # below fp32's spacing at 1.0 (1.2e-7) too
    assert measure_move(selected, again, 1e-9, torch.float32)["effective_fraction"] == 0.0


def test_gradient_cosine_of_known_vectors():
    a = [torch.tensor([[1.0, 0.0]]), torch.tensor([0.0])]
    b = [torch.tensor([[1.0, 1.0]]), torch.tensor([0.0])]
    got = gradient_change(a, b)
    assert got["grad_cosine"] == pytest.approx(1 / math.sqrt(2), abs=1e-7)  # fp32 norms
    assert got["grad_norm_change"] == pytest.approx(math.sqrt(2) - 1, abs=1e-7)
    assert got["grad_norm_at_theta"] == 1.0
    assert gradient_change(a, [-t for t in a])["grad_cosine"] == pytest.approx(-1.0, abs=1e-12)
    same = gradient_change(b, [t.clone() for t in b])
    assert same["grad_cosine"] == 1.0 and same["grad_norm_change"] == 0.0  # identical: exactly 1
    # a parameter without a gradient on one side counts as zeros: a = (3, 0), b = (3, 4)
    got = gradient_change([torch.tensor([3.0]), None], [torch.tensor([3.0]), torch.tensor([4.0])])
    assert got["grad_cosine"] == pytest.approx(3 / 5, abs=1e-12)
    norm_only = gradient_change(a, None)
    assert norm_only["grad_norm_at_theta"] == 1.0 and math.isnan(norm_only["grad_cosine"])


def test_gradient_cosine_resolves_gaps_far_below_fp32_rounding():
    """1 − cos = 1e-10 between two fp32 vectors: a dot product in fp32 reads it as 0 (or negative); the
    difference form recovers it to a few percent."""
    g = torch.Generator().manual_seed(1)
    a = torch.randn(100_000, generator=g, dtype=torch.float64)
    noise = torch.randn(100_000, generator=g, dtype=torch.float64)
    noise -= (noise @ a) / (a @ a) * a  # orthogonal to a
    b = a + noise * (math.sqrt(2e-10) * a.norm() / noise.norm())  # angle θ with 1 − cos θ ≈ θ²/2 = 1e-10
    want = 1 - float((a @ b) / (a.norm() * b.norm()))
    got = gradient_change([a.float()], [b.float()])
    assert 1 - got["grad_cosine"] == pytest.approx(want, rel=0.05)


def test_diagnostics_are_local_sums_reduced_over_shards():
    """FSDP holds each weight as row shards on different processes: every diagnostic computed on one shard, with
    ``sum_over_shards`` adding the other shard's local sums, equals the one computed on the whole weight."""
    g = torch.Generator().manual_seed(2)
    full_w = torch.randn(8, 12, generator=g)
    full_g = torch.randn(8, 12, generator=g)
    idx = torch.tensor([0, 5, 11])
    gamma = 0.3

    def shard(rows):
        w = torch.nn.Parameter(full_w[rows].clone())
        w.grad = full_g[rows].clone()
        return [SelectedNeurons(w, idx, axis=1)]

    whole, top, bottom = shard(slice(0, 8)), shard(slice(0, 5)), shard(slice(5, 8))
    want_move = measure_move(whole, perturb_selected(whole, gamma), gamma, torch.bfloat16)
    captured = []
    measure_move(bottom, perturb_selected(bottom, gamma), gamma, torch.bfloat16, lambda t: captured.append(t) or t)
    got_move = measure_move(top, perturb_selected(top, gamma), gamma, torch.bfloat16, lambda t: t + captured[0])
    assert got_move == pytest.approx(want_move, rel=1e-6)  # fp32 norms of different slices
    assert selected_grad_norm(top, lambda t: t + selected_grad_norm(bottom) ** 2) == pytest.approx(
        selected_grad_norm(whole), rel=1e-6)

    other = full_g + 0.1 * torch.randn(8, 12, generator=g)
    want = gradient_change([full_g], [other])
    captured.clear()
    gradient_change([full_g[5:]], [other[5:]], lambda t: captured.append(t) or t)
    got = gradient_change([full_g[:5]], [other[:5]], lambda t: t + captured[0])
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)  # the norm change is a difference of fp32 norms


# ------------------------------------------------------------------------------------------ matched controls
def test_matched_control_moves_exactly_as_far_as_the_probe_step(tiny_model_dir):
    """On the same gradients (a real DPO backward on the tiny model, in float64 so the realised move is exact), the
    raw probe step and a matched random or uniform control draw the same γ and move their weights by the same
    ‖δ‖, measured on the weights themselves."""
    from test_train_policy import records, with_reference

    from workflow.lib.models import load_model, load_tokenizer, mlp_output_projections
    from workflow.lib.pairs import collate_pairs, encode_response_pair
    from workflow.lib.parallel import DataParallel
    from workflow.lib.train_step import preference_loss

    torch.manual_seed(0)
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    recs = with_reference(model, tok, records(2))
    model = model.double()
    batch = collate_pairs([encode_response_pair(tok, r, 48, 24) for r in recs], tok.pad_token_id)
    loss, _, _ = preference_loss(model, batch, recs, preset(loss="dpo", beta=0.1), DataParallel("fp32"))
    loss.backward()
    layers = mlp_output_projections(model)
    probe = [SelectedNeurons(l.weight, torch.tensor([1, 4, 9]), l.axis) for l in layers]
    controls = {"random": [SelectedNeurons(layers[0].weight, torch.tensor([0, 2, 3, 30, 50, 63]), layers[0].axis)],
                "uniform": [SelectedNeurons(l.weight, torch.arange(l.n_neurons), l.axis) for l in layers]}

    def realised_move(selected, gamma):
        before = [p.detach().clone() for p in model.parameters()]
        saved = perturb_selected(selected, gamma)
        move = math.sqrt(sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(model.parameters(), before)))
        restore_selected(selected, saved)
        return move

    raw = preset(loss="dpo", beta=0.1, sharpness={"interval": 1})["sharpness"]
    gamma = step_size(raw, probe, random.Random(7))
    probe_move = realised_move(probe, gamma)
    assert probe_move == pytest.approx(gamma * selected_grad_norm(probe), rel=1e-9)
    for kind, selected in controls.items():
        matched = preset(loss="dpo", beta=0.1, sharpness={"interval": 1, "subspace": kind,
                                                          "perturbation": "matched"})["sharpness"]
        gamma_c = step_size(matched, selected, random.Random(7), probe=probe)
        assert gamma_c != gamma
        assert realised_move(selected, gamma_c) == pytest.approx(probe_move, rel=1e-6), kind
        # the same γ (the unmatched control) moves the uniform set much farther
        same_gamma = realised_move(selected, gamma)
        assert kind == "random" or same_gamma > 3 * probe_move
    with pytest.raises(ValueError, match="matched needs the probe-selected neurons"):
        step_size(matched, controls["uniform"], random.Random(7))


def test_matched_control_logs_the_probe_steps_move_length(tiny_model_dir):
    """Through the training loop: at step 1 both runs start from the same weights and batch, so the matched
    uniform control's ‖δ‖ equals the raw probe step's."""
    from test_train_policy import SETTINGS, records, with_reference

    from workflow.lib.models import load_model, load_tokenizer, mlp_output_projections
    from workflow.train_policy import train

    def first_step(sharpness, control):
        torch.manual_seed(0)
        model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
        layers = mlp_output_projections(model)
        probe = [SelectedNeurons(l.weight, torch.tensor([1, 4, 9]), l.axis) for l in layers]
        selected = [SelectedNeurons(l.weight, torch.arange(l.n_neurons), l.axis) for l in layers] if control else probe
        method = preset(loss="dpo", beta=0.1, sharpness={"interval": 1, **sharpness})
        recs = with_reference(model, tok, records(2))
        return train(model, tok, recs, method, SETTINGS, 0, selected=selected, matched_to=probe if control else None)[0]

    probe_row = first_step({"gamma_min": 1e-3, "gamma_max": 2e-3}, control=False)
    control_row = first_step({"gamma_min": 1e-3, "gamma_max": 2e-3, "subspace": "uniform",
                              "perturbation": "matched"}, control=True)
    assert control_row["move_norm"] == pytest.approx(probe_row["move_norm"], rel=1e-6)
    assert control_row["grad_norm_moved"] > probe_row["grad_norm_moved"]  # a larger set, so a smaller γ
    assert control_row["gamma"] < probe_row["gamma"]


def test_matched_presets_read_the_probe_subspace_and_need_a_control_subspace():
    assert reads_subspace(preset(loss="dpo", beta=0.1, sharpness={"interval": 5, "subspace": "uniform",
                                                                  "perturbation": "matched"}))
    assert not reads_subspace(preset(loss="dpo", beta=0.1, sharpness={"interval": 5, "subspace": "uniform",
                                                                      "perturbation": "normalized"}))
    config = {"presets": {"bad": preset(loss="dpo", beta=0.1, sharpness={"interval": 5, "perturbation": "matched"})}}
    with pytest.raises(ConfigError, match="presets.bad.sharpness.perturbation: matched"):
        check_presets(config)


# ------------------------------------------------------------------------------ inert vs effective, tiny model
@pytest.fixture(scope="module")
def realistic_tiny_dir(tmp_path_factory):
    """A tiny Llama with the usual initialisation scale (std 0.02, as SmolLM2's weights), so that bf16's spacing
    at the weights' magnitude relates to a move as it does in a real model (the suite's tiny model uses 0.3)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from workflow.lib.models import embedded_gguf

    folder = tmp_path_factory.mktemp("models") / "tiny-llama-std002"
    gguf_dir, gguf_file = embedded_gguf("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True, initializer_range=0.02)
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def train_logged(model_dir, sharpness: dict, precision: str, n_pairs: int = 4):
    from test_train_policy import SETTINGS, records, with_reference

    from workflow.lib.models import load_model, load_tokenizer, mlp_output_projections
    from workflow.lib.parallel import DataParallel
    from workflow.train_policy import train

    torch.manual_seed(0)
    model, tok = load_model(model_dir), load_tokenizer(model_dir)
    recs = with_reference(model, tok, records(n_pairs))
    selected = [SelectedNeurons(l.weight, torch.arange(0, l.n_neurons, 10), l.axis) for l in mlp_output_projections(model)]
    method = preset(loss="dpo", beta=0.1, sharpness={"interval": 1, **sharpness})
    log = train(model, tok, recs, method, SETTINGS, 0, selected=selected, parallel=DataParallel(precision))
    return method, pd.DataFrame(log).assign(method="m", noise=0.0, seed=0, path="m/noise0/seed0.train_log.tsv")


def test_raw_step_is_inert_in_bf16_and_the_normalized_step_is_effective(realistic_tiny_dir):
    """The reference code's raw step (γ ~ U[2e-6, 4e-6]) under bf16 autocast (here on the CPU) changes almost no
    moved weight as the forward pass sees it and leaves the gradient's direction at 1; a normalized step of
    length ρ = 0.05 changes most of them and turns the gradient measurably."""
    thresholds = (1e-3, 1e-6)
    raw, logs = train_logged(realistic_tiny_dir, {"gamma_min": 2e-6, "gamma_max": 4e-6}, "bf16")
    assert logs.sharpness_step.all() and (logs.move_norm < 1e-5).all()
    row = summarise(logs, {"m": raw, "dpo": preset(loss="dpo", beta=0.1)}, ["m"], *thresholds).iloc[0]
    assert row.verdict == "inert" and row.base == "dpo", row.statement
    assert row.effective_fraction < 1e-3 and row.cosine_gap < 1e-6
    assert row.statement.startswith("m is inert:") and "it trains as dpo" in row.statement

    normalized, logs = train_logged(realistic_tiny_dir, {"perturbation": "normalized", "rho": 0.05}, "bf16")
    assert logs.move_norm.to_numpy() == pytest.approx(0.05, rel=1e-6)
    row = summarise(logs, {"m": normalized}, ["m"], *thresholds).iloc[0]
    assert row.verdict == "effective", row.statement
    assert row.effective_fraction > 0.5 and row.cosine_gap > 1e-5 and row.delta_loss > 0


# ------------------------------------------------------------------------------------------ the summary table
def step_rows(method, fractions, cosines, deltas=None, sharp=True):
    deltas = deltas or [0.0] * len(fractions)
    return pd.DataFrame({"method": method, "step": range(1, len(fractions) + 1), "loss": 0.7,
                         "loss_perturbed": [0.7 + d for d in deltas], "sharpness_step": sharp, "move_norm": 1e-6,
                         "move_relative": 1e-7, "effective_fraction": fractions, "grad_cosine": cosines,
                         "grad_norm_change": 0.0, "noise": 0.0, "seed": 0,
                         "path": f"{method}/noise0/seed0.train_log.tsv"})


def test_verdict_threshold_and_statement_follow_the_numbers():
    presets = {"dpo": preset(loss="dpo", beta=0.1), "drdpo": preset(loss="dpo", beta=0.1, dr_beta=1.0),
               "shapo": preset(loss="dpo", beta=0.1, sharpness={"interval": 5}),
               "drshapo": preset(loss="dpo", beta=0.1, dr_beta=1.0, sharpness={"interval": 5}),
               "strong": preset(loss="ipo", beta=0.1, sharpness={"interval": 5, "perturbation": "normalized"}),
               "late": preset(loss="dpo", beta=0.1, sharpness={"interval": 50})}
    assert base_method("shapo", presets) == "dpo" and base_method("drshapo", presets) == "drdpo"
    assert base_method("strong", presets) == ""
    logs = pd.concat([step_rows("shapo", [0.0, 1e-4, 0.0], [1.0, 1 - 1e-9, 1.0]),
                      # fp32-like: most weights change by an ulp, the gradient does not turn: inert by the cosine
                      step_rows("drshapo", [0.9, 0.8, 0.85], [1 - 1e-12, 1 - 3e-13, 1.0]),
                      step_rows("strong", [0.9, 0.95, 0.9], [1 - 2e-4, 1 - 3e-4, 1 - 1e-4], [0.02, 0.01, 0.03]),
                      step_rows("late", [0.0], [1.0], sharp=False)])
    table = summarise(logs, presets, ["dpo", "shapo", "drshapo", "strong", "late"], 1e-3, 1e-6).set_index("method")
    assert list(table.index) == ["shapo", "drshapo", "strong", "late"]  # dpo has no sharpness block
    assert table.verdict.to_dict() == {"shapo": "inert", "drshapo": "inert", "strong": "effective", "late": "no step"}
    assert table.loc["strong", "delta_loss"] == pytest.approx(0.02)
    assert table.loc["strong", "cosine_gap"] == pytest.approx(2e-4)
    assert "drshapo is inert" in table.loc["drshapo", "statement"] and "trains as drdpo" in table.loc["drshapo", "statement"]
    assert table.loc["strong", "statement"].startswith("strong is effective:")
    assert "took no sharpness-aware step" in table.loc["late", "statement"]
    # the thresholds are the config's: a stricter fraction threshold alone does not make shapo effective
    assert is_inert(0.0, 1e-3, 1e-3, 1e-6) and is_inert(0.5, 1e-9, 1e-3, 1e-6)
    assert not is_inert(0.5, 1e-3, 1e-3, 1e-6) and not is_inert(0.5, float("nan"), 1e-3, 1e-6)


# ------------------------------------------------------------------------------------------ in the DAG and report
def test_report_says_which_sharpness_step_is_inert(sharpness_run):
    """The tiny run with every step sharpness-aware (interval 1; conftest.py's sharpness_run): the raw shapo step
    and the matched uniform control are reported inert (fp32 on the CPU: most moved weights change by an ulp,
    the gradient's direction stays at 1 − 1e-12), the normalized step effective; the comparisons table says so,
    the figure is drawn."""
    from conftest import jobs_run
    from test_report import assert_valid_png

    workdir, proc = sharpness_run
    assert "perturbation_summary" in jobs_run(proc) and "train_policy" in jobs_run(proc)
    table = pd.read_csv(workdir / "results/tables/perturbation.csv").set_index("method")
    assert table.verdict.to_dict() == {"shapo": "inert", "shapo_normalized": "effective", "shapo_uniform": "inert"}
    assert (table.steps == 3).all() and (table.base == "dpo").all()
    assert table.loc["shapo_normalized", "move_norm"] == pytest.approx(0.05, rel=1e-6)
    # the matched control moved as far as shapo's step (the same first step; later steps differ a little)
    logs = {m: pd.read_csv(workdir / f"results/policies/{m}/noise0.25/seed0.train_log.tsv", sep="\t")
            for m in ("shapo", "shapo_uniform")}
    assert logs["shapo_uniform"].move_norm[0] == pytest.approx(logs["shapo"].move_norm[0], rel=1e-6)
    md = (workdir / "results/report.md").read_text()
    section = md.split("## Is the perturbation effective?\n", 1)[1].split("\n## ", 1)[0]
    assert "below 0.001 (the forward pass saw almost the same weights) or the median gradient cosine is above " \
           "1 − 1e-06" in section
    assert "shapo is inert: over 3 sharpness-aware step(s) of 1 run(s)" in section
    assert "shapo_normalized is effective:" in section
    assert "So the comparison of shapo with dpo above compares dpo with itself" in section
    assert "](figures/perturbation_effect.png)" in section
    comparisons = md.split("## Comparisons with dpo\n", 1)[1].split("\n## ", 1)[0]
    assert "| shapo | dpo | 0.25 | harmbench |" in comparisons
    rows = {line.split(" | ")[0].lstrip("| "): line for line in comparisons.splitlines() if "| harmbench |" in line}
    assert rows["shapo"].endswith("| inert (trains as dpo) |") and rows["shapo_normalized"].endswith("| effective |")
    assert_valid_png(workdir / "results/figures/perturbation_effect.png")
    assert (workdir / "results/figures/perturbation_effect.pdf").read_bytes().startswith(b"%PDF")
    # the inert steps move the held-out margins by rounding only (about 1e-6, the same sign on every pair, so
    # the bootstrap p is small): printed with their digits, "numerically identical", never starred
    pref = pd.read_csv(workdir / "results/tables/preference_comparisons.csv").set_index(["method", "metric"])
    for method in ("shapo", "shapo_uniform"):
        row = pref.loc[(method, "mean_margin")]
        assert 0 < abs(row["diff"]) < 1e-4 and row.identical and not row.significant and pd.isna(row["mark"]), method
    shown = (workdir / "results/tables/preference_comparisons.md").read_text()
    assert "| method | shapo ε=0.25 | dpo ε=0.25 | held-out mean margin | 0.486 → 0.486 | +2.7e-06 [" in shown
    assert shown.count("numerically identical") >= 4
