import math

import torch

from workflow.lib.losses import dpo_logits, dpo_loss


def test_dpo_logit_and_loss_match_hand_computation():
    # policy gains 0.5 nats on the chosen answer and loses 0.5 on the rejected one, relative to the reference
    h = dpo_logits(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]))
    assert h.item() == 1.0
    # -log sigmoid(0.1 * 1.0) = log(1 + exp(-0.1))
    assert math.isclose(dpo_loss(h, beta=0.1).item(), math.log(1 + math.exp(-0.1)), rel_tol=1e-6)
    assert math.isclose(dpo_loss(h, beta=0.1).item(), 0.6443966600735709, rel_tol=1e-6)


def test_dpo_loss_is_log2_at_the_reference():
    assert math.isclose(dpo_loss(torch.zeros(3), beta=0.5).mean().item(), math.log(2), rel_tol=1e-6)


def test_label_smoothing_mixes_both_directions():
    h = torch.tensor([2.0])
    eps, beta = 0.1, 0.5
    expected = (1 - eps) * math.log(1 + math.exp(-beta * 2.0)) + eps * math.log(1 + math.exp(beta * 2.0))
    assert math.isclose(dpo_loss(h, beta, label_smoothing=eps).item(), expected, rel_tol=1e-6)


def test_loss_is_per_pair():
    assert dpo_loss(torch.tensor([1.0, -1.0, 0.0]), beta=0.1).shape == (3,)


def test_rdpo_against_hand_computed_value():
    from workflow.lib.losses import rdpo_loss

    # h = 1, β = 0.1, ε = 0.2: ((0.8·log(1+e^-0.1)) − 0.2·log(1+e^0.1)) / 0.6
    expected = (0.8 * math.log(1 + math.exp(-0.1)) - 0.2 * math.log(1 + math.exp(0.1))) / 0.6
    assert math.isclose(rdpo_loss(torch.tensor([1.0]), 0.1, 0.2).item(), expected, rel_tol=1e-6)
    assert math.isclose(expected, 0.611063, rel_tol=1e-5)
    # ε = 0 is plain DPO
    assert torch.allclose(rdpo_loss(torch.tensor([0.3]), 0.1, 0.0), dpo_loss(torch.tensor([0.3]), 0.1))


def test_ipo_against_hand_computed_values():
    from workflow.lib.losses import ipo_loss

    assert ipo_loss(torch.tensor([1.0, 3.0]), tau=0.5).tolist() == [0.0, 4.0]  # target margin 1/(2τ) = 1
    assert ipo_loss(torch.tensor([3.0]), tau=0.25).item() == 1.0


def test_simpo_against_hand_computed_value():
    from workflow.lib.losses import simpo_loss

    # average log-probs −1 vs −2, β = 2, γ = 0.5: −log σ(2·1 − 0.5) = log(1 + e^-1.5)
    got = simpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), beta=2.0, margin=0.5).item()
    assert math.isclose(got, 0.2014132779827524, rel_tol=1e-6)


def test_soft_labels_and_their_cross_entropy():
    from workflow.lib.losses import soft_label_loss, soft_labels

    p = soft_labels(torch.tensor([2.0]), torch.tensor([1.0]), beta_r=1.0)
    assert math.isclose(p.item(), 1 / (1 + math.exp(-1.0)), rel_tol=1e-6)
    h = torch.tensor([0.7])
    assert torch.allclose(soft_label_loss(h, 0.1, torch.tensor([1.0])), dpo_loss(h, 0.1))  # hard label = DPO
    assert math.isclose(soft_label_loss(torch.zeros(1), 0.1, torch.tensor([0.5])).item(), math.log(2), rel_tol=1e-6)


def test_dr_dpo_reduction_against_hand_computed_value():
    from workflow.lib.losses import reduce_losses

    losses = torch.tensor([1.0, 3.0])
    # −β′·log mean exp(−ℓ/β′) with β′ = 1: −log((e^-1 + e^-3)/2)
    assert math.isclose(reduce_losses(losses, dr_beta=1.0).item(), 1.5662191695169727, rel_tol=1e-6)
    assert reduce_losses(losses).item() == 2.0
    assert math.isclose(reduce_losses(losses, dr_beta=1e4).item(), 2.0, rel_tol=1e-3)  # β′ → ∞: the mean
    assert reduce_losses(losses, dr_beta=0.01).item() < 1.01  # β′ → 0: the smallest loss dominates


def test_pair_losses_dispatch_by_preset():
    from workflow.lib.config import fill_defaults
    from workflow.lib.losses import PairLogps, pair_losses

    def preset(**kw):
        return fill_defaults(kw, "presets/*")

    logps = PairLogps(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5]),
                      torch.tensor([4]), torch.tensor([2]))
    assert torch.allclose(pair_losses(preset(loss="dpo", beta=0.1), logps), dpo_loss(torch.tensor([1.0]), 0.1))
    cdpo = pair_losses(preset(loss="cdpo", beta=0.1, label_smoothing=0.1), logps)
    assert torch.allclose(cdpo, dpo_loss(torch.tensor([1.0]), 0.1, 0.1))
    # SimPO uses length-normalised log-probs: −1/4 vs −2/2
    simpo = pair_losses(preset(loss="simpo", beta=2.0, simpo_margin=0.0), logps)
    assert math.isclose(simpo.item(), math.log(1 + math.exp(-2.0 * 0.75)), rel_tol=1e-6)
    # length_normalize: h from per-token log-ratios (0.5/4 − (−0.5)/2 = 0.375) instead of the sums (1.0)
    ipo = pair_losses(preset(loss="ipo", beta=0.5, length_normalize=True), logps)
    assert math.isclose(ipo.item(), (0.375 - 1.0) ** 2, rel_tol=1e-6)
    assert pair_losses(preset(loss="ipo", beta=0.5), logps).item() == 0.0  # summed h = 1 = 1/(2τ)


def test_simpo_margin_absolute_or_as_a_ratio_of_beta():
    """γ = simpo_margin, or γ = simpo_gamma_ratio·β (the official code's simpo_gamma_beta_ratio)."""
    from workflow.lib.losses import simpo_loss, simpo_margin

    assert simpo_margin({"beta": 2.0, "simpo_margin": 0.5}) == 0.5
    assert simpo_margin({"beta": 2.0, "simpo_gamma_ratio": 0.5}) == 1.0
    assert simpo_margin({"beta": 0.1, "simpo_gamma_ratio": 0.5}) == 0.05
    # the official loss −log σ(β·(Δavg − ratio)) is ours with γ = β·ratio
    d, beta, ratio = torch.tensor([0.3]), 2.0, 0.5
    official = -torch.nn.functional.logsigmoid(beta * (d - ratio))
    assert torch.allclose(simpo_loss(d, torch.zeros(1), beta, simpo_margin({"beta": beta, "simpo_gamma_ratio": ratio})),
                          official)
    import pytest
    with pytest.raises(ValueError, match="simpo_margin .* or simpo_gamma_ratio"):
        simpo_margin({"beta": 2.0})


def test_loss_registry_names_the_losses_and_their_preset_keys():
    """Adding a loss = one registered function (+ its name in the schema's enum, tests/test_config.py); every key a
    loss reads is a preset property of the schema."""
    from workflow.lib.config import schema
    from workflow.lib.losses import LOSSES, register

    props = schema()["properties"]["presets"]["additionalProperties"]["properties"]
    for name, loss in LOSSES.items():
        assert set(loss.params) <= set(props), (name, loss.params)
    assert LOSSES["simpo"].params == ("simpo_margin", "simpo_gamma_ratio")
    import pytest
    with pytest.raises(ValueError, match="registered twice"):
        register("dpo")(lambda logps, preset: None)


def test_config_takes_simpo_margin_one_way_and_only_for_simpo():
    """workflow/lib/config.py: exactly one of simpo_margin / simpo_gamma_ratio on a simpo preset, neither elsewhere."""
    import pytest

    from workflow.lib.config import ConfigError, fill_defaults
    from workflow.lib.checks import check_presets

    def check(**preset):
        check_presets({"presets": {"p": fill_defaults(preset, "presets/*")}})

    check(loss="simpo", beta=2.0, simpo_margin=0.5)
    check(loss="simpo", beta=2.0, simpo_gamma_ratio=0.5)
    with pytest.raises(ConfigError, match=r"presets\.p\.simpo_margin: .*exactly one.*\['simpo_margin', 'simpo_gamma_ratio'\]"):
        check(loss="simpo", beta=2.0, simpo_margin=0.5, simpo_gamma_ratio=0.5)
    with pytest.raises(ConfigError, match=r"presets\.p\.simpo_margin: .*sets neither"):
        check(loss="simpo", beta=2.0)
    with pytest.raises(ConfigError, match=r"presets\.p\.simpo_gamma_ratio: only loss simpo reads it"):
        check(loss="dpo", beta=0.1, simpo_gamma_ratio=0.5)
    with pytest.raises(ConfigError, match=r"presets\.p\.length_normalize: SimPO is always length-normalised"):
        check(loss="simpo", beta=2.0, simpo_margin=0.5, length_normalize=True)
