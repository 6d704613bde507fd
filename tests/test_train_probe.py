"""Probe texts (template, pairs, sampling), the length rule, both probe fits and their comparison (issue 11)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from workflow.lib.config import ConfigError, fill_defaults
from workflow.lib.checks import check_probe_data
from workflow.lib.files import read_json, read_jsonl, write_jsonl
from workflow.probe_data import build_probe_set, pku_response_texts, render
from workflow.report import fit_sensitivity
from workflow.select_subspace import jaccard, select_top_percent
from workflow.train_probe import (cosine, fit_both, fit_linear_head, fit_logistic, length_filter, split_heldout,
                                  token_lengths)

HH = fill_defaults({}, "probe/data")["template"]


def toy(n=80, dim=8, shift=3.0, seed=0):
    """Two Gaussian clouds apart along axis 2: unsafe (label 1) at +shift, safe (0) at -shift."""
    rng = np.random.default_rng(seed)
    axis = np.zeros(dim)
    axis[2] = shift
    x = np.concatenate([rng.normal(size=(n, dim)) + axis, rng.normal(size=(n, dim)) - axis]).astype(np.float32)
    return x, np.array([1] * n + [0] * n)


# ---- texts ----

def test_default_template_is_the_official_hh_scaffold():
    assert HH == "\n\nHuman: {prompt}\n\nAssistant:{response}"
    assert render(HH, "How do I pick a lock?", " I can't help.") == "\n\nHuman: How do I pick a lock?\n\nAssistant: I can't help."
    # one pass: a placeholder inside the prompt is text, not a slot
    assert render("{prompt}|{response}", "say {response}", "ok") == "say {response}|ok"


def test_pku_texts_use_the_template_keep_raw_text_and_carry_their_pair():
    rows = [{"prompt": "p0 ", "response_0": "safe answer", "response_1": " bad answer", "is_response_0_safe": True,
             "is_response_1_safe": False},
            {"prompt": "p1", "response_0": "  ", "response_1": "other bad", "is_response_0_safe": True,
             "is_response_1_safe": "false"}]
    classes, removed, prompts, pair_of, prompt_of = pku_response_texts(rows, {}, "rows", "<{prompt}>[{response}]")
    assert classes == {"safe": ["<p0 >[safe answer]"], "unsafe": ["<p0 >[ bad answer]", "<p1>[other bad]"]}
    assert pair_of == {"<p0 >[safe answer]": 0, "<p0 >[ bad answer]": 0, "<p1>[other bad]": 1}
    rows_out = build_probe_set(classes["unsafe"], classes["safe"], 10, 0, "all", pair_of, prompt_of)
    # each text records the (stripped) prompt it was built from: what benchmark prompts are compared with
    assert sorted((r["text"], r["label"], r["pair"], r["prompt"]) for r in rows_out) == [
        ("<p0 >[ bad answer]", 1, 0, "p0"), ("<p0 >[safe answer]", 0, 0, "p0"), ("<p1>[other bad]", 1, 1, "p1")]


def test_sample_all_keeps_every_text_unbalanced_and_seeded():
    unsafe, safe = [f"u{i}" for i in range(10)], [f"s{i}" for i in range(3)]
    rows = build_probe_set(unsafe, safe, n_per_class=2, seed=1, sample="all")
    assert sorted(r["text"] for r in rows) == sorted(unsafe + safe)
    assert rows == build_probe_set(unsafe, safe, 2, 1, "all") != build_probe_set(unsafe, safe, 2, 2, "all")
    assert len(build_probe_set(unsafe, safe, n_per_class=2, seed=1, sample="balanced")) == 4  # n_per_class each


def test_template_without_a_slot_is_refused():
    spec = fill_defaults({"format": "pku-saferlhf", "source": {"path": "x"}, "template": "Q: {prompt}"}, "probe/data")
    with pytest.raises(ConfigError, match=r"config key probe.data.template: .* has no \{response\}"):
        check_probe_data(spec)


# ---- length rule ----

def test_drop_rule_drops_at_max_tokens_and_the_whole_pair():
    lengths = np.array([255, 256, 10, 300, 12, 5])
    assert length_filter(lengths, 256).tolist() == [True, False, True, False, True, True]
    # texts 0 and 1 share pair 7 (1 is too long, so 0 goes too); text 3's pair has no other text here
    keep = length_filter(lengths, 256, [7, 7, 8, 9, None, 8])
    assert keep.tolist() == [False, False, True, False, True, True]


def test_token_lengths_count_what_the_model_sees(tiny_model_dir):
    from workflow.lib.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    texts = ["hello there", "a much longer text " * 20]
    assert token_lengths(tok, texts).tolist() == [len(tok(t)["input_ids"]) for t in texts]


# ---- fits ----

def test_both_fits_separate_a_toy_problem_and_point_to_unsafe():
    x, y = toy()
    d, b, _ = fit_logistic(x, y)
    assert np.argmax(np.abs(d)) == 2 and d[2] > 0
    settings = {"lr": 0.05, "batch_size": 32, "epochs": 20, "valid_every": 2, "checkpoint": "best_in_last_epoch"}
    h, hb, info = fit_linear_head(x, y, x[::4], y[::4], settings, seed=0)
    assert np.argmax(np.abs(h)) == 2 and h[2] > 0
    assert np.mean((x @ h + hb > 0) == (y == 1)) > 0.95
    assert cosine(d, h) > 0.8
    assert info["steps"] == 20 * 5 and 19 * 5 <= info["kept_step"] < 20 * 5  # a step of the last epoch
    assert info["init_share"] < 0.1


def test_linear_head_at_the_official_lr_stays_near_its_init():
    """Few Adam steps at lr 1e-5 barely move the head: the direction is mostly its random init (official.md §3)."""
    x, y = toy(dim=64)
    settings = fill_defaults({}, "probe")["linear_head"]  # lr 1e-5, batch 256, 10 epochs: 10 steps here
    h, _, info = fit_linear_head(x, y, x[:20], y[:20], settings, seed=0)
    assert info["steps"] == 10 and info["init_share"] > 0.9 and info["cosine_with_init"] > 0.95


def test_linear_head_checkpoint_choice_and_seed():
    x, y = toy()
    xv, yv = x[::4], y[::4]
    base = {"lr": 0.05, "batch_size": 16, "epochs": 3, "valid_every": 1}  # 10 steps per epoch, a check after each
    best, best_b, info_best = fit_linear_head(x, y, xv, yv, base | {"checkpoint": "best_in_last_epoch"}, 3)
    last, last_b, info_last = fit_linear_head(x, y, xv, yv, base | {"checkpoint": "last"}, 3)
    again, _, _ = fit_linear_head(x, y, xv, yv, base | {"checkpoint": "best_in_last_epoch"}, 3)
    other, _, _ = fit_linear_head(x, y, xv, yv, base | {"checkpoint": "best_in_last_epoch"}, 4)
    assert np.array_equal(best, again) and not np.array_equal(best, other)
    assert info_last["kept_step"] == 29 and 20 <= info_best["kept_step"] <= 29

    def heldout_loss(d, b):  # two-class softmax NLL depends only on the logit difference
        margin = (x @ d + b)[::4] * np.where(yv == 1, 1, -1)
        return float(np.mean(np.log1p(np.exp(-margin))))

    assert heldout_loss(best, best_b) <= heldout_loss(last, last_b) + 1e-6


def test_linear_head_keeps_the_best_check_of_the_last_epoch_not_of_all_epochs():
    """Held-out labels opposite to the training labels: the held-out loss rises with every step, so the best
    check of an epoch is its first (step 0 of the epoch), and the head kept is the last epoch's first."""
    x, y = toy()
    settings = {"lr": 0.05, "batch_size": 16, "epochs": 3, "valid_every": 1}
    best, _, info = fit_linear_head(x, y, x, 1 - y, settings | {"checkpoint": "best_in_last_epoch"}, 0)
    last, _, _ = fit_linear_head(x, y, x, 1 - y, settings | {"checkpoint": "last"}, 0)
    assert info["kept_step"] == 20 and not np.allclose(best, last)


def test_fit_both_reports_the_configured_fit_first_and_the_cosine_of_the_two():
    x, y = toy()
    spec = fill_defaults({"fit": "linear_head", "n_heldout": 40, "linear_head": {"lr": 0.05, "batch_size": 32}},
                         "probe")
    directions, metrics = fit_both(x, y, spec)
    assert metrics["fit"] == "linear_head" and metrics["secondary_fit"] == "logistic"
    assert metrics["n_heldout"] == 40 and metrics["n_train"] == 120
    assert metrics["heldout_accuracy"] == metrics["fits"]["linear_head"]["heldout_accuracy"] > 0.9
    assert metrics["fit_cosine"] == pytest.approx(cosine(directions["linear_head"], directions["logistic"]))


def test_held_out_split_by_count_or_fraction():
    y = np.array([0, 1] * 50)
    train, held = split_heldout(y, 0.25, 0, seed=0)
    assert len(held) == 25 and len(train) == 75
    train, held = split_heldout(y, 0.25, 30, seed=0)
    assert len(held) == 30 and sorted(np.concatenate([train, held]).tolist()) == list(range(100))
    with pytest.raises(ConfigError, match="config key probe.n_heldout"):
        split_heldout(y, 0.25, 99, seed=0)
    with pytest.raises(ConfigError, match="1 unsafe and 50 safe"):
        split_heldout(np.array([0] * 50 + [1]), 0.25, 0, seed=0)


# ---- comparison of the two selections ----

def test_cosine_and_jaccard_on_known_inputs():
    assert cosine(np.array([1.0, 0.0]), np.array([1.0, 1.0])) == pytest.approx(2 ** -0.5)
    a = [torch.tensor([0, 1, 2]), torch.tensor([5])]
    b = [torch.tensor([1, 2]), torch.tensor([5, 6])]
    assert jaccard(a, b) == pytest.approx(3 / 5)  # shared (0,1) (0,2) (1,5); union adds (0,0) (1,6)
    assert jaccard(a, a) == 1.0
    # the same index in different layers is a different neuron
    assert jaccard([torch.tensor([0]), torch.tensor([])], [torch.tensor([]), torch.tensor([0])]) == 0.0


def test_subspace_size_is_the_official_floor():
    # Llama-3.2-3B: 28 layers x 8192 neurons, 1% -> int(2293.76) = 2293 (get_sentive_n.py:166-168)
    scores = [torch.randn(8192) for _ in range(28)]
    assert sum(len(t) for t in select_top_percent(scores, 1.0, "negative")) == 2293


def test_report_sentence_from_metrics_and_summary():
    metrics = {"fit": "logistic", "secondary_fit": "linear_head", "fit_cosine": 0.25,
               "fits": {"linear_head": {"init_share": 0.19, "cosine_with_init": 0.9}}}
    summary = pd.DataFrame({"selected": [3, 1], "secondary_selected": [2, 2], "shared": [2, 1]})
    text = fit_sensitivity(metrics, summary)
    assert "cosine 0.250" in text and "Jaccard 0.600" in text and "4 neurons of which 3 are shared" in text
    assert fit_sensitivity({"fit": "logistic"}, summary) is None


# ---- the stages on the tiny model ----

def test_train_probe_and_select_subspace_on_the_tiny_model(tiny_model_dir, tmp_path):
    from workflow import select_subspace, train_probe

    rng = np.random.default_rng(0)
    words = ["kill", "steal", "poison", "hack", "bread", "garden", "music", "tea"]
    rows = []
    for i in range(40):
        bad = i % 2 == 0
        text = " ".join(rng.choice(words[:4] if bad else words[4:], size=6))
        rows.append({"text": text, "label": 1 if bad else 0, "pair": i // 2})
    long_text = "tea " * 80  # over max_tokens: dropped with its pair-mate (pair 0)
    rows[1] = {"text": long_text, "label": 0, "pair": 0}
    write_jsonl(tmp_path / "data.jsonl", rows)
    spec = {"max_tokens": 40, "length_rule": "drop", "fit": "logistic", "linear_head": {"lr": 0.01, "batch_size": 8}}
    train_probe.main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "data.jsonl"),
                      "--spec-json", json.dumps(spec), "--direction", str(tmp_path / "direction.safetensors"),
                      "--metrics", str(tmp_path / "metrics.json")])
    metrics = read_json(tmp_path / "metrics.json")
    assert metrics["texts"] == {"read": 40, "kept": 38, "dropped": 2, "too_long": 1, "truncated": 0,
                                "unsafe": 19, "safe": 19, "longest_kept": metrics["texts"]["longest_kept"]}
    assert metrics["texts"]["longest_kept"] < 40 and metrics["model"] == "base"
    assert set(metrics["fits"]) == {"logistic", "linear_head"} and -1 <= metrics["fit_cosine"] <= 1
    tensors = load_file(tmp_path / "direction.safetensors")
    assert set(tensors) == {"direction", "secondary"}
    assert metrics["fit_cosine"] == pytest.approx(cosine(tensors["direction"].numpy(), tensors["secondary"].numpy()),
                                                  abs=1e-6)

    select_subspace.main(["--model", str(tiny_model_dir), "--direction", str(tmp_path / "direction.safetensors"),
                          "--percent", "10", "--rank", "negative", "--neurons", str(tmp_path / "neurons.safetensors"),
                          "--summary", str(tmp_path / "summary.tsv")])
    summary = pd.read_csv(tmp_path / "summary.tsv", sep="\t")
    assert summary.selected.sum() == summary.secondary_selected.sum() == 12  # floor(10% of 2 x 64)
    with safe_open(tmp_path / "neurons.safetensors", "pt") as f:
        stored = float(f.metadata()["jaccard_with_secondary"])
    shared = summary.shared.sum()
    assert stored == pytest.approx(shared / (24 - shared))

    # the secondary selection is the one the secondary direction alone gives
    save_file({"direction": tensors["secondary"]}, tmp_path / "secondary.safetensors")
    select_subspace.main(["--model", str(tiny_model_dir), "--direction", str(tmp_path / "secondary.safetensors"),
                          "--percent", "10", "--rank", "negative", "--neurons", str(tmp_path / "n2.safetensors"),
                          "--summary", str(tmp_path / "s2.tsv")])
    alone = pd.read_csv(tmp_path / "s2.tsv", sep="\t")
    assert alone.selected.tolist() == summary.secondary_selected.tolist() and "shared" not in alone

    # truncate: nothing dropped, the long text counted as cut
    spec |= {"length_rule": "truncate"}
    train_probe.main(["--model", str(tiny_model_dir), "--data", str(tmp_path / "data.jsonl"),
                      "--spec-json", json.dumps(spec), "--direction", str(tmp_path / "d2.safetensors"),
                      "--metrics", str(tmp_path / "m2.json")])
    texts = read_json(tmp_path / "m2.json")["texts"]
    assert texts["kept"] == 40 and texts["dropped"] == 0 and texts["truncated"] == 1 and texts["longest_kept"] == 40
    assert len(read_jsonl(tmp_path / "data.jsonl")) == 40


def test_params_json_hides_template_slots_from_snakemake_wildcards():
    from snakemake_interface_storage_plugins.io import WILDCARD_REGEX

    from workflow.lib.jobs import params_json

    obj = {"data": {"template": "\n\nHuman: {prompt}\n\nAssistant:{response}", "q": 'say "{x}" \\ {y,z}'}, "n": [1]}
    text = params_json(obj)
    assert json.loads(text) == obj and WILDCARD_REGEX.search(text) is None


@pytest.mark.parametrize("probe_model, expected", [("base", "results/models/base"), ("start", "results/models/sft")])
def test_probe_model_switch_with_sft_on(workdir, probe_model, expected):
    """With SFT on, probe and subspace read the frozen base model (official) or, with probe.model start, the SFT model."""
    import re

    from conftest import run_snakemake

    override = workdir / "override.yaml"
    override.write_text(f"sft: {{enabled: true}}\nprobe: {{model: {probe_model}}}\n")
    proc = run_snakemake(workdir, "-n", "-p", "results/subspace/neurons.safetensors",
                         "--configfile", str(workdir / "config.yaml"), str(override))
    models = re.findall(r"python -m workflow\.(train_probe|select_subspace) --model (\S+)", proc.stdout)
    assert sorted(models) == [("select_subspace", expected), ("train_probe", expected)]
    assert ("sft" in jobs(proc.stdout)) == (probe_model == "start")


def jobs(dry_run: str) -> dict[str, int]:
    import re

    return {m[1]: int(m[2]) for m in re.finditer(r"^([a-z_]+)\s+(\d+)$", dry_run, re.M) if m[1] != "total"}


def test_report_shows_the_fit_sensitivity(reference_run):
    metrics = read_json(reference_run[0] / "results/probe/metrics.json")
    report = (reference_run[0] / "results/report.md").read_text()
    assert f"has cosine {metrics['fit_cosine']:.3f} with it" in report and "Jaccard" in report
