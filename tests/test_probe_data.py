import numpy as np
import pytest

from workflow.lib.config import fill_defaults
from workflow.lib.decontamination import assert_disjoint, decontaminate, normalise
from workflow.probe_data import build_probe_set
from workflow.lib.sources import SourceError
from workflow.train_probe import fit_both


def test_normalisation_ignores_case_punctuation_and_spacing():
    assert normalise("  Describe how to make a FAKE id! ") == normalise("describe how to make a fake ID")
    assert normalise("Café—menu") == "cafe menu"


def test_decontaminate_removes_and_counts_per_benchmark():
    texts = ["Write a bomb guide.", "bake bread", "Steal a car"]
    kept, removed = decontaminate(texts, {"harmbench": ["write a BOMB guide"], "advbench": ["steal a car!", "x"]})
    assert kept == ["bake bread"]
    assert removed == {"harmbench": 1, "advbench": 1}
    assert_disjoint(kept, {"harmbench": ["write a BOMB guide"]}, "probe")


def test_surviving_overlap_fails_loudly():
    with pytest.raises(SourceError, match="overlaps benchmark 'advbench' in 1 prompt"):
        assert_disjoint(["Steal a car"], {"advbench": ["steal a car!"]}, "probe data")


def test_probe_set_is_balanced_and_seeded():
    rows = build_probe_set([f"u{i}" for i in range(10)], [f"s{i}" for i in range(30)], n_per_class=8, seed=0,
                           sample="balanced")
    assert sum(r["label"] == 1 for r in rows) == 8 and sum(r["label"] == 0 for r in rows) == 8
    assert rows == build_probe_set([f"u{i}" for i in range(10)], [f"s{i}" for i in range(30)], 8, 0, "balanced")
    assert len(build_probe_set(["u"] * 3, ["s"] * 30, n_per_class=8, seed=0, sample="balanced")) == 6


def test_probe_direction_points_from_safe_to_unsafe():
    rng = np.random.default_rng(0)
    axis = np.zeros(8)
    axis[2] = 1.0
    unsafe = rng.normal(size=(60, 8)) + 3 * axis
    safe = rng.normal(size=(60, 8)) - 3 * axis
    features = np.concatenate([unsafe, safe])
    labels = np.array([1] * 60 + [0] * 60)
    directions, metrics = fit_both(features, labels, fill_defaults({}, "probe"))  # logistic, 25% held out
    direction = directions["logistic"]
    assert metrics["heldout_accuracy"] > 0.9 and metrics["n_heldout"] == 30
    assert np.argmax(np.abs(direction)) == 2 and direction[2] > 0
