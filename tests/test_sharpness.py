import torch

from workflow.lib.sharpness import SelectedNeurons, perturb_selected, restore_selected


def weight_with_grad(shape, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.nn.Parameter(torch.randn(shape, generator=g))
    w.grad = torch.randn(shape, generator=g)
    return w


def test_perturbation_moves_only_selected_columns_and_is_undone_exactly():
    w = weight_with_grad((6, 10), seed=0)
    before = w.detach().clone()
    idx = torch.tensor([1, 4, 7])
    selected = [SelectedNeurons(w, idx, axis=1)]
    saved = perturb_selected(selected, gamma=0.5)
    others = [i for i in range(10) if i not in idx.tolist()]
    assert torch.equal(w.detach()[:, others], before[:, others])
    assert torch.allclose(w.detach()[:, idx], before[:, idx] + 0.5 * w.grad[:, idx])
    restore_selected(selected, saved)
    assert torch.equal(w.detach(), before)


def test_row_layout_of_gpt2_conv1d():
    w = weight_with_grad((10, 6), seed=1)
    before = w.detach().clone()
    idx = torch.tensor([0, 9])
    selected = [SelectedNeurons(w, idx, axis=0)]
    saved = perturb_selected(selected, gamma=2.0)
    assert torch.equal(w.detach()[1:9], before[1:9])
    assert torch.allclose(w.detach()[idx], before[idx] + 2.0 * w.grad[idx])
    restore_selected(selected, saved)
    assert torch.equal(w.detach(), before)


def test_saved_memory_is_the_selected_slices_only():
    w = weight_with_grad((576, 1536), seed=2)
    idx = torch.arange(0, 1536, 100)
    saved = perturb_selected([SelectedNeurons(w, idx, axis=1)], gamma=1e-6)
    assert saved[0].shape == (576, len(idx))


def test_perturbation_needs_gradients():
    w = torch.nn.Parameter(torch.zeros(3, 3))
    try:
        perturb_selected([SelectedNeurons(w, torch.tensor([0]), axis=1)], 1.0)
    except RuntimeError as e:
        assert "backward" in str(e)
    else:
        raise AssertionError("perturbing without gradients must fail")


def test_normalized_step_moves_the_subspace_by_rho():
    import random

    from workflow.lib.sharpness import selected_grad_norm, step_size

    w = weight_with_grad((8, 12), seed=3)
    before = w.detach().clone()
    selected = [SelectedNeurons(w, torch.tensor([2, 5, 11]), axis=1)]
    gamma = step_size({"perturbation": "normalized", "rho": 0.05}, selected, random.Random(0))
    assert abs(gamma * selected_grad_norm(selected) - 0.05) < 1e-6
    perturb_selected(selected, gamma)
    assert abs(float((w.detach() - before).norm()) - 0.05) < 1e-5
    raw = step_size({"perturbation": "raw", "gamma_min": 2e-6, "gamma_max": 4e-6}, selected, random.Random(0))
    assert 2e-6 <= raw <= 4e-6
