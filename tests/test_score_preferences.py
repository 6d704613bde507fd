"""The held-out preference metric: margins and accuracy by hand, the minimum detectable difference, the paired
comparisons (training, noise, methods), and the stage in the tiny DAG (tables, figure, the report's three
statements)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from workflow.lib.files import read_jsonl, write_jsonl
from workflow.lib.pairs import text_key
from workflow.score_preferences import correct, margins, pair_logps, summarise
from workflow.lib.tables import preference_comparisons, preference_table


def test_margin_and_accuracy_by_hand():
    # (chosen, rejected) log-probs of the policy and of the reference, three pairs
    policy = np.array([[-10.0, -12.0], [-7.0, -5.0], [-3.0, -4.0]])
    reference = np.array([[-11.0, -11.0], [-6.0, -6.0], [-2.0, -3.0]])
    # pair 1: 0.1·[(−10+11) − (−12+11)] = 0.1·2 = 0.2; pair 2: 0.1·[(−1) − (+1)] = −0.2; pair 3: 0.1·[−1 − (−1)] = 0
    m = margins(policy, reference, beta=0.1)
    assert np.allclose(m, [0.2, -0.2, 0.0])
    assert correct(m).tolist() == [1.0, 0.0, 0.5]
    s = summarise(m)
    assert s["accuracy"] == pytest.approx(0.5) and s["mean_margin"] == pytest.approx(0.0) and s["ties"] == 1
    # β scales the margin, never its sign
    assert np.array_equal(correct(margins(policy, reference, beta=2.0)), correct(m))


def test_pair_logps_are_looked_up_by_pair_and_answer_text():
    records = [{"pair_id": "a", "chosen": "yes", "rejected": "no"}]
    rows = [{"pair_id": "a", "logps": {text_key("no"): -2.0, text_key("yes"): -1.0}}]
    assert pair_logps(rows, records, "f").tolist() == [[-1.0, -2.0]]
    with pytest.raises(ValueError, match="pair 'a' was scored with other answers"):
        pair_logps(rows, [{"pair_id": "a", "chosen": "yes", "rejected": "maybe"}], "f")
    with pytest.raises(ValueError, match="no log-probs for held-out pair 'b'"):
        pair_logps(rows, [{"pair_id": "b", "chosen": "yes", "rejected": "no"}], "f")


def _scores(models: dict[tuple, list[float]]) -> pd.DataFrame:
    """Per-pair margins of models keyed (method, noise, seed) -> the stats input frame."""
    rows = []
    for (method, noise, seed), ms in models.items():
        for i, m in enumerate(ms):
            rows.append({"method": method, "noise": noise, "seed": seed, "id": f"p{i}", "margin": m,
                         "correct": float(correct(m))})
    data = pd.DataFrame(rows)
    data["noise"] = pd.to_numeric(data["noise"])
    data["seed"] = data["seed"].astype("Int64")
    return data


def test_preference_table_and_comparisons_by_hand():
    data = _scores({
        ("base", None, None): [0.0] * 4,
        ("dpo", 0.0, 0): [0.3, 0.2, 0.1, -0.2],     # accuracy 0.75, mean 0.1
        ("dpo", 0.4, 0): [0.1, -0.1, -0.1, -0.3],   # accuracy 0.25, mean −0.1
        ("shapo", 0.0, 0): [0.3, 0.2, 0.1, 0.2],    # accuracy 1.0, mean 0.2
        ("shapo", 0.4, 0): [0.1, 0.1, -0.1, -0.3],  # accuracy 0.5, mean −0.05
    })
    table = preference_table(data, n_boot=200, level=0.95, seed=0).set_index(["method", "noise"], drop=False)
    assert table.method.iloc[0] == "base" and table.accuracy.iloc[0] == 0.5 and table.mean_margin.iloc[0] == 0.0
    assert table.loc[("dpo", 0.0), "accuracy"] == pytest.approx(0.75)
    assert table.loc[("dpo", 0.4), "mean_margin"] == pytest.approx(-0.1)
    assert np.isfinite(table[["accuracy_ci_low", "accuracy_ci_high"]].to_numpy()).all()

    comp = preference_comparisons(data, "dpo", n_boot=500, level=0.95, seed=0)
    acc = comp[comp.metric == "accuracy"].set_index(["comparison", "method", "noise"])
    assert acc.loc[("training", "dpo", 0.0), "diff"] == pytest.approx(0.25)      # 0.75 − 0.5
    assert acc.loc[("training", "dpo", 0.0), "vs_method"] == "base"
    assert acc.loc[("noise", "dpo", 0.4), "diff"] == pytest.approx(-0.5)         # 0.25 − 0.75
    assert acc.loc[("method", "shapo", 0.0), "diff"] == pytest.approx(0.25)      # 1.0 − 0.75
    assert acc.loc[("method", "shapo", 0.4), "diff"] == pytest.approx(0.25)      # 0.5 − 0.25
    margin = comp[comp.metric == "mean_margin"].set_index(["comparison", "method", "noise"])
    assert margin.loc[("method", "shapo", 0.4), "diff"] == pytest.approx(0.05)
    # Holm over the method rows only (2 methods x noise x 2 metrics = 4 p-values); preconditions unadjusted
    assert comp.loc[comp.comparison != "method", "p_holm"].isna().all()
    family = comp[comp.comparison == "method"]
    assert len(family) == 4 and (family.p_holm >= family.p_bootstrap).all()


def test_comparisons_pair_by_pair_id():
    data = _scores({("dpo", 0.0, 0): [0.1, 0.2], ("shapo", 0.0, 0): [0.1, 0.2]})
    data.loc[(data.method == "shapo") & (data.id == "p1"), "id"] = "other"
    with pytest.raises(ValueError, match="held-out pair ids differ"):
        preference_comparisons(data, "dpo", n_boot=100, level=0.95, seed=0)


def test_score_preferences_cli_matches_a_hand_computation(tmp_path, tiny_model_dir):
    """The stage's margins equal β·Δ of log-probs computed here with the model itself; without --model
    (the model is the reference) every margin is 0 and the accuracy 0.5."""
    from workflow.lib.models import format_prompt, load_model, load_tokenizer
    from workflow.reference_logps import main as reference_main
    from workflow.score_preferences import main

    pairs = [{"pair_id": f"h{i}", "messages": [{"role": "user", "content": q}], "chosen": c, "rejected": r}
             for i, (q, c, r) in enumerate([("How do I pick a lock?", "I can't help with that.", "Use a tension wrench."),
                                             ("Say hi", "Hi there!", "No.")])]
    write_jsonl(tmp_path / "heldout.jsonl", pairs)
    settings = json.dumps({"max_length": 64, "max_prompt_length": 32, "batch_size": 2})
    # the reference is the tiny model; the "policy" is the tiny model with its final norm scaled
    reference_main(["--model", str(tiny_model_dir), "--pairs", str(tmp_path / "heldout.jsonl"), "--training-json",
                    settings, "--prompt-format", "chat", "--output", str(tmp_path / "ref.jsonl")])
    policy_dir = tmp_path / "policy"
    model = load_model(tiny_model_dir)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    model.save_pretrained(policy_dir)
    load_tokenizer(tiny_model_dir).save_pretrained(policy_dir)
    main(["--pairs", str(tmp_path / "heldout.jsonl"), "--reference", str(tmp_path / "ref.jsonl"), "--model",
          str(policy_dir), "--beta", "0.5", "--training-json", settings, "--prompt-format", "chat",
          "--tags-json", '{"method": "dpo", "noise": 0.0, "seed": 0}',
          "--output", str(tmp_path / "scores.jsonl"), "--summary", str(tmp_path / "scores.json")])
    rows = read_jsonl(tmp_path / "scores.jsonl")

    tok = load_tokenizer(tiny_model_dir)
    ref_model, pol_model = load_model(tiny_model_dir).eval(), load_model(policy_dir).eval()

    def logp(m, prompt, answer):  # summed log p(answer | prompt), token by token
        p_ids = tok(format_prompt(tok, prompt, "chat"), add_special_tokens=False)["input_ids"][-32:]
        a_ids = (tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])[:64 - len(p_ids)]
        with torch.no_grad():
            logits = m(torch.tensor([p_ids + a_ids])).logits[0].log_softmax(-1)
        return sum(float(logits[len(p_ids) - 1 + k, t]) for k, t in enumerate(a_ids))

    for r, pair in zip(rows, pairs):
        h = [logp(pol_model, pair["messages"], pair[s]) - logp(ref_model, pair["messages"], pair[s])
             for s in ("chosen", "rejected")]
        assert r["margin"] == pytest.approx(0.5 * (h[0] - h[1]), abs=1e-4)
        assert r["correct"] == (1.0 if r["margin"] > 0 else 0.0)
        assert r["method"] == "dpo" and r["seed"] == 0
    summary = json.loads((tmp_path / "scores.json").read_text())
    assert summary["accuracy"] == pytest.approx(np.mean([r["correct"] for r in rows]))
    assert any(abs(r["margin"]) > 1e-3 for r in rows)  # the scaled norm did change the log-probs

    main(["--pairs", str(tmp_path / "heldout.jsonl"), "--reference", str(tmp_path / "ref.jsonl"), "--beta", "0.1",
          "--tags-json", '{"method": "base", "noise": null, "seed": null}',
          "--output", str(tmp_path / "base.jsonl"), "--summary", str(tmp_path / "base.json")])
    base = json.loads((tmp_path / "base.json").read_text())
    assert base["accuracy"] == 0.5 and base["mean_margin"] == 0.0 and base["ties"] == 2


def test_preference_stage_in_the_tiny_run(reference_run):
    """The finished tiny run scored every model on the held-out pairs; the tables, the figure and the report's
    three statements are there."""
    workdir, proc = reference_run
    tables = workdir / "results/tables"
    prefs = pd.read_csv(tables / "preference_accuracy.csv")
    models = {(m, None if pd.isna(n) else n) for m, n in zip(prefs.method, prefs.noise)}
    assert models == {("base", None)} | {(m, n) for m in ("dpo", "shapo") for n in (0.0, 0.25)}
    assert np.isfinite(prefs[["accuracy", "accuracy_ci_low", "accuracy_ci_high", "mean_margin"]].to_numpy()).all()
    assert prefs.loc[prefs.method == "base", "accuracy"].item() == 0.5  # the base model is the reference
    assert (prefs.pairs == 4).all()

    comp = pd.read_csv(tables / "preference_comparisons.csv")
    assert set(comp.comparison) == {"training", "noise", "method"}
    assert set(comp.metric) == {"accuracy", "mean_margin"}
    assert np.isfinite(comp[["diff", "ci_low", "ci_high", "p_bootstrap"]].to_numpy()).all()
    harmful = pd.read_csv(tables / "comparisons.csv")
    assert "mdd80" in harmful.columns
    assert "held-out preference accuracy" in (tables / "harmful_rate.md").read_text()

    assert (workdir / "results/figures/preference_accuracy_vs_noise.png").exists()
    report = (workdir / "results/report.md").read_text()
    for statement in ("1. Training works —", "2. Noise matters —", "3. Each method against dpo",
                      "The smallest difference this run could detect"):
        assert statement in report, statement
    assert "## Held-out preference accuracy" in report
    assert "preference_accuracy_vs_noise.png" in report
