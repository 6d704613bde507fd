"""Reward-level ShaPO: soft labels, the Bradley-Terry head, hub reward/cost models, the reward stage in the DAG."""
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from workflow import plot_soft_labels, reward_model
from workflow.lib.checks import check_preset
from workflow.lib.config import ConfigError, fill_defaults
from workflow.lib.files import read_jsonl, write_jsonl
from workflow.lib.losses import PairLogps, dpo_loss, pair_losses, reduce_losses, soft_label_loss, soft_labels
from workflow.lib.pairs import text_key
from workflow.train_policy import attach_soft_labels

SIGMOID_2 = 0.8807970779778823  # σ(2)


def test_soft_labels_hand_computed():
    p = soft_labels(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 3.0]), beta_r=2.0)
    assert torch.allclose(p, torch.tensor([SIGMOID_2, 0.5, 1 - 0.9820137900379085]), atol=1e-7)  # σ(2), σ(0), σ(−4)
    # the plot stage's numpy twin agrees
    assert np.allclose(plot_soft_labels.soft_labels(np.array([1.0, 0.0, -2.0]), 2.0), p.numpy(), atol=1e-7)


def test_soft_label_loss_hand_computed():
    h = torch.tensor([1.0, 1.0])
    # −0.75·log σ(1) − 0.25·log σ(−1) = 0.75·0.3132617 + 0.25·1.3132617
    got = soft_label_loss(h, 1.0, torch.tensor([0.75, 1.0]))
    assert got[0].item() == pytest.approx(0.5632617, abs=1e-6)
    assert got[1].item() == pytest.approx(dpo_loss(h[1:], 1.0).item(), abs=1e-7)  # p = 1 is DPO
    # p = 0.5 is minimised at h = 0 (no preference): gradient zero there
    h0 = torch.zeros(1, requires_grad=True)
    soft_label_loss(h0, 0.1, torch.tensor([0.5])).sum().backward()
    assert h0.grad.abs().item() < 1e-7


def pair(h, labels):
    n = len(h)
    return PairLogps(torch.tensor(h), torch.zeros(n), torch.zeros(n), torch.zeros(n), torch.ones(n), torch.ones(n),
                     torch.tensor(labels) if labels is not None else None)


def test_reward_level_preset_uses_soft_labels_and_composes_with_dr_beta():
    method = fill_defaults({"loss": "dpo", "beta": 1.0, "reward_labels": {"beta_r": 1.0}}, "presets/*")
    losses = pair_losses(method, pair([1.0, -1.0], [0.75, 0.25]))
    # symmetric: the second pair is the first seen from the other side
    assert torch.allclose(losses, torch.tensor([0.5632617, 0.5632617]), atol=1e-6)
    dr = reduce_losses(losses, dr_beta=1.0)  # −log mean exp(−ℓ) of equal losses is ℓ
    assert dr.item() == pytest.approx(0.5632617, abs=1e-6)
    with pytest.raises(ValueError, match="needs soft labels"):
        pair_losses(method, pair([1.0], None))
    with pytest.raises(ConfigError, match="config key presets.soft_ipo.loss: a reward-level preset .* needs loss dpo"):
        check_preset("soft_ipo", method | {"loss": "ipo"})


def test_flipped_pairs_get_swapped_rewards():
    clean = [{"pair_id": i, "chosen": f"safe {i}", "rejected": f"unsafe {i}"} for i in ("a", "b")]
    rewards = [{"pair_id": r["pair_id"], "r_chosen": 2.0, "r_rejected": 0.0, "chosen_key": text_key(r["chosen"]),
                "rejected_key": text_key(r["rejected"])} for r in clean]
    noisy = [dict(clean[0], flipped=False), dict(clean[1], chosen="unsafe b", rejected="safe b", flipped=True)]
    attach_soft_labels(noisy, rewards, 1.0, "rewards.jsonl")
    assert noisy[0]["soft_label"] == pytest.approx(SIGMOID_2)
    assert noisy[1]["soft_label"] == pytest.approx(1 - SIGMOID_2)  # the soft label undoes the flip
    unmarked = [dict(clean[1], chosen="unsafe b", rejected="safe b", flipped=False)]
    with pytest.raises(ValueError, match="rewards.jsonl: pair 'b' was scored with other answers"):
        attach_soft_labels(unmarked, rewards, 1.0, "rewards.jsonl")
    with pytest.raises(ValueError, match="no rewards for pair 'c'"):
        attach_soft_labels([dict(clean[0], pair_id="c")], rewards, 1.0, "rewards.jsonl")


def test_bradley_terry_head_learns_a_separable_problem():
    rng = np.random.default_rng(0)
    w_true = rng.normal(size=16)

    def pairs(n):
        a, b = rng.normal(size=(n, 16)), rng.normal(size=(n, 16))
        a_wins = (a @ w_true > b @ w_true)[:, None]
        return np.where(a_wins, a, b), np.where(a_wins, b, a)

    chosen, rejected = pairs(200)
    w = reward_model.fit_bradley_terry(chosen, rejected, l2=1e-3)
    assert reward_model.pair_accuracy(chosen @ w, rejected @ w) >= 0.97
    test_chosen, test_rejected = pairs(200)
    assert reward_model.pair_accuracy(test_chosen @ w, test_rejected @ w) >= 0.9
    assert np.dot(w, w_true) / np.linalg.norm(w) / np.linalg.norm(w_true) > 0.9


def random_pairs(n, dim, seed):
    """Features with no signal, and labels that are coin flips: a head can only learn them by memorising."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)), rng.normal(size=(n, dim))


def test_a_head_fitted_on_its_own_pairs_reproduces_random_labels_and_a_cross_fitted_one_cannot():
    """The leak of issue 11: a head fitted on the clean labels of the pairs it then scores reproduces those labels
    even when they are random; the cross-fitted out-of-fold rewards are at chance on the same pairs."""
    chosen, rejected = random_pairs(200, 400, seed=0)  # more dimensions than pairs: memorisable
    leaking = reward_model.fit_bradley_terry(chosen, rejected, l2=1.0)
    assert reward_model.pair_accuracy(chosen @ leaking, rejected @ leaking) == 1.0
    folds = reward_model.fold_ids(200, 5, seed=0)
    heads = reward_model.cross_fit(chosen, rejected, folds, l2=1.0)
    oof = reward_model.pair_accuracy(reward_model.out_of_fold(chosen, folds, heads),
                                     reward_model.out_of_fold(rejected, folds, heads))
    assert 0.35 < oof < 0.65  # chance (200 coin flips: 0.5 ± 0.035)
    assert reward_model.in_sample_accuracy(chosen, rejected, folds, heads) == 1.0  # each head memorised its own folds


def test_no_pairs_own_label_reaches_its_reward_difference():
    """Swap chosen and rejected of one pair (its label): its own out-of-fold reward difference only changes sign,
    because the head that scores it was fitted without it; a head fitted on all pairs would move."""
    chosen, rejected = random_pairs(40, 60, seed=1)
    folds = reward_model.fold_ids(40, 4, seed=0)
    assert sorted(np.bincount(folds)) == [10, 10, 10, 10]

    def diffs(c, r):
        heads = reward_model.cross_fit(c, r, folds, l2=1.0)
        return reward_model.out_of_fold(c, folds, heads) - reward_model.out_of_fold(r, folds, heads)

    before = diffs(chosen, rejected)
    for i in (0, 17, 39):
        c, r = chosen.copy(), rejected.copy()
        c[i], r[i] = rejected[i], chosen[i]
        after = diffs(c, r)
        assert after[i] == pytest.approx(-before[i], abs=1e-12)  # same head, pair seen from the other side
        same_fold = (folds == folds[i]) & (np.arange(40) != i)
        assert np.allclose(after[same_fold], before[same_fold], atol=1e-12)  # its fold's head did not change
        assert not np.allclose(after[folds != folds[i]], before[folds != folds[i]])  # the other heads saw the swap


def test_folds_are_checked():
    with pytest.raises(ValueError, match="reward_model.folds: 5 folds need at least 5 training pairs, have 3"):
        reward_model.fold_ids(3, 5, seed=0)
    assert reward_model.fold_ids(10, 3, seed=0).tolist() == reward_model.fold_ids(10, 3, seed=0).tolist()


def test_pair_accuracy_hand_computed():
    assert reward_model.pair_accuracy(np.array([1.0, 0.0, 2.0, 1.0]), np.array([0.0, 1.0, 1.0, 1.0])) == 0.5


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory, tiny_model_dir):
    """A one-output sequence-classification Llama with the tiny model's tokenizer (a stand-in reward model)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    folder = tmp_path_factory.mktemp("reward") / "tiny-rm"
    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.num_labels = 1
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


PAIRS = [{"pair_id": f"p{i}", "messages": [{"role": "user", "content": f"How do I do thing {i}?"}],
          "chosen": "I can't help with that.", "rejected": f"Sure, step {i}: do it."} for i in range(4)]


def run_reward_cli(tmp_path, spec, model=None):
    write_jsonl(tmp_path / "train.jsonl", PAIRS)
    write_jsonl(tmp_path / "heldout.jsonl", PAIRS[:2])
    args = ["--train", str(tmp_path / "train.jsonl"), "--heldout", str(tmp_path / "heldout.jsonl"),
            "--reward-json", json.dumps(spec), "--training-json",
            json.dumps({"max_length": 48, "max_prompt_length": 24}),
            "--rewards", str(tmp_path / "rewards.jsonl"), "--metrics", str(tmp_path / "metrics.json")]
    reward_model.main(args + (["--model", str(model)] if model else []))
    return read_jsonl(tmp_path / "rewards.jsonl"), json.loads((tmp_path / "metrics.json").read_text())


def test_hub_cost_model_sign_flips_the_scores(tiny_classifier, tmp_path):
    reward, metrics = run_reward_cli(tmp_path, {"kind": "hub", "name_or_path": str(tiny_classifier), "sign": 1})
    cost, cost_metrics = run_reward_cli(tmp_path, {"kind": "hub", "name_or_path": str(tiny_classifier), "sign": -1})
    assert [r["pair_id"] for r in reward] == [p["pair_id"] for p in PAIRS]
    for r, c in zip(reward, cost):
        assert c["r_chosen"] == pytest.approx(-r["r_chosen"]) and c["r_rejected"] == pytest.approx(-r["r_rejected"])
    assert metrics["n_train"] == 4 and cost_metrics["sign"] == -1
    assert cost_metrics["train_accuracy"] == pytest.approx(1.0 - metrics["train_accuracy"])  # no ties here
    # a custom template reaches the scorer: Beaver-style text differs from the chat template's
    text = reward_model.conversation_text(None, PAIRS[0], "No.", "USER: {prompt} ASSISTANT:{answer}")
    assert text == "USER: How do I do thing 0? ASSISTANT:No."


def test_hub_model_without_a_classification_head_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="lacks weights of .*score"):
        run_reward_cli(tmp_path, {"kind": "hub", "name_or_path": str(tiny_model_dir)})


def test_reward_model_refuses_noisy_training_pairs(tmp_path):
    write_jsonl(tmp_path / "noisy.jsonl", [dict(PAIRS[0], flipped=True)])
    with pytest.raises(ValueError, match="noisy.jsonl: pair 'p0' is flipped"):
        reward_model.check_clean(read_jsonl(tmp_path / "noisy.jsonl"), str(tmp_path / "noisy.jsonl"))


def test_soft_label_table_hand_computed():
    rewards = [{"pair_id": "a", "r_chosen": 1.0, "r_rejected": 0.0}, {"pair_id": "b", "r_chosen": 2.0, "r_rejected": 0.0}]
    frame = plot_soft_labels.reward_frame(rewards, [{"pair_id": "a", "flipped": False},
                                                    {"pair_id": "b", "flipped": True}], "noisy.jsonl")
    assert frame["d_noisy"].tolist() == [1.0, -2.0]
    row = plot_soft_labels.soft_label_table(frame, [2.0]).iloc[0]
    assert row["mean_p_clean"] == pytest.approx(SIGMOID_2)                  # σ(2·1)
    assert row["mean_p_flipped"] == pytest.approx(1 / (1 + math.exp(4)))   # σ(2·−2)
    assert row["frac_flips_corrected"] == 1.0 and row["frac_p_above_half"] == 0.5
    with pytest.raises(ValueError, match="other.jsonl: no pair 'b'"):
        plot_soft_labels.reward_frame(rewards, [{"pair_id": "a"}], "other.jsonl")


def check_reward_outputs(workdir, n_train=12, n_heldout=4, n_flipped=3):
    """The reward stage's outputs of a tiny run (used by the all-presets DAG test in test_train_policy.py)."""
    metrics = json.loads((workdir / "results/reward/metrics.json").read_text())
    assert metrics["kind"] == "bt_head" and metrics["n_train"] == n_train and metrics["n_heldout"] == n_heldout
    # train_accuracy is out of fold (cross-fitted), so it may fall below the heads' in-sample accuracy
    assert 0.0 <= metrics["heldout_accuracy"] <= 1.0 and 0.0 <= metrics["train_accuracy"] <= 1.0
    assert metrics["folds"] == 5 and 0.0 <= metrics["train_accuracy_in_sample"] <= 1.0
    rewards = read_jsonl(workdir / "results/reward/pair_rewards.jsonl")
    train = read_jsonl(workdir / "results/data/preferences/train.jsonl")
    assert [r["pair_id"] for r in rewards] == [r["pair_id"] for r in train]
    assert all(math.isfinite(r["r_chosen"]) and math.isfinite(r["r_rejected"]) for r in rewards)
    table = pd.read_csv(workdir / "results/reward/soft_labels.tsv", sep="\t")
    assert table["beta_r"].tolist() == [0.5, 1.0, 2.0, 5.0] and (table["n_flipped"] == n_flipped).all()
    for ext in ("png", "pdf"):
        assert (workdir / f"results/figures/reward_soft_labels.{ext}").stat().st_size > 1000
    log = (workdir / "results/logs/train_policy/dpo_reward_noise0.25_seed0.log").read_text()
    assert "soft_label_mean_flipped" in log
