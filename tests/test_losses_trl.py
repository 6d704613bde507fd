"""Our preference losses next to TRL's own loss code (trl==1.16.0, pinned in requirements.txt), on the same log-probs.

TRL has no standalone loss function: the formulas live in ``DPOTrainer._compute_loss`` (a method that runs a
model forward) and ``CPOTrainer.cpo_loss`` (SimPO). The test calls them unbound, with a stand-in ``self`` that
holds the settings they read and a stub model whose per-token log-probs sum to the sequence log-probs we chose
(``precompute_ref_logps`` makes TRL read the reference log-probs from the batch). This couples the test to
TRL 1.16.0's private attributes: a TRL upgrade that renames one fails loudly here (AttributeError), never silently.

Parameter mapping (ours: a preset of workflow/lib/losses.py; TRL: DPOConfig / CPOConfig fields), docs/training.md:

================================  =====================================================================
ours                              TRL 1.16.0
================================  =====================================================================
dpo, beta β                       DPOTrainer loss_type="sigmoid", beta=β
cdpo, beta β, label_smoothing ε   no single loss_type (TRL's sigmoid ignores label_smoothing): the
                                  weighted sum loss_type=["sigmoid", "robust"],
                                  loss_weights=[2(1−ε), −(1−2ε)], label_smoothing=ε, beta=β
rdpo, beta β, label_smoothing ε   loss_type="robust", label_smoothing=ε, beta=β
ipo, beta τ, length_normalize     loss_type="ipo", beta=τ (TRL always averages the log-ratios per token)
ipo, beta τ (summed, default)     none: equals TRL's ipo only when every answer is one token long
dpo, beta β, length_normalize     loss_type="sigmoid_norm", beta=β
simpo, beta β, simpo_margin γ     CPOTrainer.cpo_loss, loss_type="simpo", beta=β, simpo_gamma=γ, cpo_alpha=0
simpo, beta β, simpo_gamma_ratio  the same with simpo_gamma=r·β
================================  =====================================================================

Both sides reduce a batch by the mean (TRL always; ours without dr_beta). Token counts: TRL's completion_mask row
sums (clamped ≥ 1) are our ``chosen_tokens`` / ``rejected_tokens`` (answer tokens scored, EOS included).
"""
from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from workflow.lib.config import fill_defaults
from workflow.lib.losses import PairLogps, pair_losses, reduce_losses

TOL = 1e-6  # issue 11: equality to 1e-6 (float64 gives ~1e-15)


def trl():
    """TRL's loss code; trl is a pinned dependency (requirements.txt), so its absence is a failure, not a skip."""
    try:
        import trl as trl_package
        from trl.experimental.cpo.cpo_trainer import CPOTrainer
        from trl.trainer.dpo_trainer import DPOTrainer
    except ImportError as err:  # pragma: no cover - the message is the point
        pytest.fail(f"trl is pinned in requirements.txt but cannot be imported ({err}); pip install -r requirements.txt")
    assert trl_package.__version__ == "1.16.0", "the stand-in self below matches TRL 1.16.0's private attributes"
    return DPOTrainer, CPOTrainer


def batch(n=6, seed=0):
    """Random sequence log-probs and answer lengths (float64), as PairLogps."""
    g = torch.Generator().manual_seed(seed)
    logp = lambda: -torch.rand(n, generator=g, dtype=torch.float64) * 30  # noqa: E731
    counts = lambda: torch.randint(1, 9, (n,), generator=g)  # noqa: E731
    return PairLogps(logp(), logp(), logp(), logp(), counts(), counts())


def trl_dpo_loss(logps: PairLogps, loss_type, beta, label_smoothing=0.0, loss_weights=None):
    """TRL's DPOTrainer._compute_loss (its own code) on our log-probs: the batch mean."""
    DPOTrainer, _ = trl()
    n = logps.policy_chosen.numel()
    counts = torch.cat([logps.chosen_tokens, logps.rejected_tokens])
    width = int(counts.max()) + 2
    completion_mask = torch.zeros(2 * n, width, dtype=torch.long)
    for i, c in enumerate(counts.tolist()):
        completion_mask[i, width - c:] = 1  # prompt first, completion right-aligned
    per_token = torch.zeros(2 * n, width - 1, dtype=torch.float64)
    per_token[:, -1] = torch.cat([logps.policy_chosen, logps.policy_rejected])  # TRL sums over positions

    def model(**_):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool(), aux_loss=None)

    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    stand_in = SimpleNamespace(
        model=SimpleNamespace(training=True), accelerator=accelerator, aux_loss_enabled=False,
        precompute_ref_logps=True, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=types,
        loss_weights=loss_weights or [1.0] * len(types), beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(discopop_tau=0.05))
    inputs = {"input_ids": torch.zeros(2 * n, width, dtype=torch.long),
              "attention_mask": torch.ones(2 * n, width, dtype=torch.long), "completion_mask": completion_mask,
              "ref_chosen_logps": logps.reference_chosen, "ref_rejected_logps": logps.reference_rejected}
    return DPOTrainer._compute_loss(stand_in, model, inputs, return_outputs=False)


def trl_simpo_losses(logps: PairLogps, beta, gamma):
    """TRL's CPOTrainer.cpo_loss (loss_type simpo, cpo_alpha 0) on length-averaged policy log-probs: per pair."""
    _, CPOTrainer = trl()
    stand_in = SimpleNamespace(alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=0.0,
                               accelerator=SimpleNamespace(device=torch.device("cpu")))
    avg_w = logps.policy_chosen / logps.chosen_tokens
    avg_l = logps.policy_rejected / logps.rejected_tokens
    losses, _, _ = CPOTrainer.cpo_loss(stand_in, avg_w, avg_l)
    return losses


def ours(logps: PairLogps, **preset):
    """Our batch loss through the registry (pair_losses) and the mean reduction, for a validated preset."""
    return reduce_losses(pair_losses(fill_defaults(preset, "presets/*"), logps))


def single(logps: PairLogps, i: int) -> PairLogps:
    return PairLogps(*(t[i:i + 1] for t in (logps.policy_chosen, logps.policy_rejected, logps.reference_chosen,
                                            logps.reference_rejected, logps.chosen_tokens, logps.rejected_tokens)))


CASES = [  # (our preset, TRL's loss types, TRL's settings) — the mapping of the module docstring
    ({"loss": "dpo", "beta": 0.1}, "sigmoid", {"beta": 0.1}),
    ({"loss": "dpo", "beta": 0.5}, "sigmoid", {"beta": 0.5}),
    ({"loss": "cdpo", "beta": 0.1, "label_smoothing": 0.2}, ["sigmoid", "robust"],
     {"beta": 0.1, "label_smoothing": 0.2, "loss_weights": [2 * (1 - 0.2), -(1 - 2 * 0.2)]}),
    ({"loss": "rdpo", "beta": 0.1, "label_smoothing": 0.1}, "robust", {"beta": 0.1, "label_smoothing": 0.1}),
    ({"loss": "rdpo", "beta": 0.3, "label_smoothing": 0.3}, "robust", {"beta": 0.3, "label_smoothing": 0.3}),
    ({"loss": "ipo", "beta": 0.1, "length_normalize": True}, "ipo", {"beta": 0.1}),
    ({"loss": "ipo", "beta": 0.5, "length_normalize": True}, "ipo", {"beta": 0.5}),
    ({"loss": "dpo", "beta": 0.1, "length_normalize": True}, "sigmoid_norm", {"beta": 0.1}),
]


@pytest.mark.parametrize("preset,loss_type,settings", CASES, ids=lambda c: str(c) if isinstance(c, str) else None)
def test_dpo_family_equals_trl(preset, loss_type, settings):
    for seed in range(3):
        logps = batch(seed=seed)
        assert torch.allclose(ours(logps, **preset), trl_dpo_loss(logps, loss_type, **settings), rtol=0, atol=TOL)
        for i in range(2):  # per pair, not only on average
            one = single(logps, i)
            assert torch.allclose(ours(one, **preset), trl_dpo_loss(one, loss_type, **settings), rtol=0, atol=TOL)


def test_trl_sigmoid_ignores_label_smoothing_so_cdpo_needs_the_weighted_sum():
    """The documented difference: TRL 1.16's sigmoid has no cDPO term, so cdpo (ε > 0) is not sigmoid + ε."""
    logps = batch()
    cdpo = ours(logps, loss="cdpo", beta=0.1, label_smoothing=0.2)
    assert not torch.allclose(cdpo, trl_dpo_loss(logps, "sigmoid", 0.1, label_smoothing=0.2), atol=1e-3)
    assert torch.allclose(trl_dpo_loss(logps, "sigmoid", 0.1, label_smoothing=0.2), ours(logps, loss="dpo", beta=0.1),
                          atol=TOL)


def test_our_summed_ipo_is_trls_ipo_on_one_token_answers_and_differs_otherwise():
    """Ours (default) squares the summed log-ratio like the IPO paper and the official ShaPO code (trainers.py:160-161);
    TRL averages per token. They agree when every answer has one token, and not in general."""
    logps = batch()
    summed = ours(logps, loss="ipo", beta=0.1)
    assert not torch.allclose(summed, trl_dpo_loss(logps, "ipo", 0.1), atol=1e-3)
    ones = torch.ones_like(logps.chosen_tokens)
    one_token = PairLogps(logps.policy_chosen, logps.policy_rejected, logps.reference_chosen,
                          logps.reference_rejected, ones, ones)
    assert torch.allclose(ours(one_token, loss="ipo", beta=0.1), trl_dpo_loss(one_token, "ipo", 0.1), atol=TOL)
    # and the relation itself: TRL's ipo is ours on per-token averaged log-ratios
    assert torch.allclose(ours(logps, loss="ipo", beta=0.1, length_normalize=True), trl_dpo_loss(logps, "ipo", 0.1),
                          atol=TOL)


@pytest.mark.parametrize("beta,gamma", [(2.0, 0.5), (2.0, 1.0), (0.1, 0.05)])
def test_simpo_equals_trl_cpo_simpo_with_absolute_gamma(beta, gamma):
    logps = batch()
    mine = pair_losses(fill_defaults({"loss": "simpo", "beta": beta, "simpo_margin": gamma}, "presets/*"), logps)
    assert torch.allclose(mine, trl_simpo_losses(logps, beta, gamma), rtol=0, atol=TOL)


@pytest.mark.parametrize("beta,ratio", [(2.0, 0.5), (0.1, 0.5), (2.5, 0.25)])
def test_simpo_gamma_ratio_is_trls_simpo_gamma_times_beta(beta, ratio):
    """The official ShaPO parameterisation (γ = β·simpo_gamma_beta_ratio) maps to TRL's simpo_gamma = ratio·β."""
    logps = batch(seed=1)
    mine = pair_losses(fill_defaults({"loss": "simpo", "beta": beta, "simpo_gamma_ratio": ratio}, "presets/*"), logps)
    assert torch.allclose(mine, trl_simpo_losses(logps, beta, ratio * beta), rtol=0, atol=TOL)
