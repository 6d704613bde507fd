import pytest

from workflow.inject_noise import flip_pairs


def pairs(n):
    return [{"pair_id": f"p{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(n)]


@pytest.mark.parametrize("n,rate,expected", [(10, 0.4, 4), (7, 0.3, 2), (5, 0.1, 0), (128, 0.4, 51), (3, 0.0, 0)])
def test_flips_exactly_round_rate_times_n(n, rate, expected):
    out = flip_pairs(pairs(n), rate, seed=0)
    assert sum(r["flipped"] for r in out) == expected
    for original, r in zip(pairs(n), out):
        swapped = (r["chosen"], r["rejected"]) == (original["rejected"], original["chosen"])
        assert swapped == r["flipped"]
        assert r["pair_id"] == original["pair_id"]


def test_same_seed_same_flips_other_seed_other_flips():
    a = [r["flipped"] for r in flip_pairs(pairs(100), 0.3, seed=7)]
    b = [r["flipped"] for r in flip_pairs(pairs(100), 0.3, seed=7)]
    c = [r["flipped"] for r in flip_pairs(pairs(100), 0.3, seed=8)]
    assert a == b
    assert a != c


def test_higher_rate_flips_a_superset():
    low = {i for i, r in enumerate(flip_pairs(pairs(50), 0.2, seed=3)) if r["flipped"]}
    high = {i for i, r in enumerate(flip_pairs(pairs(50), 0.4, seed=3)) if r["flipped"]}
    assert low < high


def test_input_is_not_modified():
    original = pairs(4)
    flip_pairs(original, 0.25, seed=0)
    assert original == pairs(4)


@pytest.mark.parametrize("rate", [-0.1, 0.5, 0.9])
def test_rate_outside_range_is_rejected(rate):
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        flip_pairs(pairs(4), rate, seed=0)
