"""Attacks: exact mode restoration, untouched running statistics, a closed-form FGSM check."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainables.attacks import (
    ATTACKS,
    AttackSettings,
    Perturber,
    clean_accuracy,
    eval_mode,
    module_modes,
    robust_accuracy,
)
from trainables.norms import BatchNorm, RobustNorm


def small_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1),
        BatchNorm(6),
        nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1),
        RobustNorm(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 64, 4),
    )


def batch(n: int = 16):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def running_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


def test_eval_mode_restores_every_module_flag_exactly():
    model = small_net()
    model.eval()
    model[1].train()  # a BN-only-style mix: frozen parts eval, one norm training
    model[4].train()
    before = module_modes(model)
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert module_modes(model) == before


@pytest.mark.parametrize("attack", ["fgsm", "pgd", "pgd_l2"])
def test_training_time_attack_leaves_modes_and_running_statistics_untouched(attack):
    model = small_net()
    model.train()
    x, y = batch()
    model(x)  # some statistics to protect
    model.eval()
    model[1].train()  # frozen layers in eval, norm layers training (BN-only regimes)
    model[4].train()
    modes, stats = module_modes(model), running_stats(model)
    x_adv = Perturber(model, attack, 0.1, AttackSettings(steps=3))(x, y)
    assert module_modes(model) == modes  # torchattacks' blanket model.train() did not leak
    for key, value in running_stats(model).items():
        assert torch.equal(value, stats[key]), key
    assert not torch.equal(x_adv, x) and x_adv.min() >= 0 and x_adv.max() <= 1


def test_fgsm_matches_closed_form_on_a_linear_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).eval()
    x, y = batch()
    eps = 0.07
    x_adv = Perturber(model, "fgsm", eps, AttackSettings())(x, y)
    # d CE / d x = W^T (softmax(Wx + b) - onehot(y)); FGSM steps eps along its sign, then clips to [0, 1]
    w, b = model[1].weight, model[1].bias
    p = F.softmax(x.flatten(1) @ w.T + b, dim=1)
    grad = (p - F.one_hot(y, 4).float()) @ w
    expected = (x.flatten(1) + eps * grad.sign()).clamp(0, 1).view_as(x)
    torch.testing.assert_close(x_adv, expected)


def test_pgd_respects_its_linf_budget_and_lowers_accuracy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).eval()
    x, _ = batch(64)
    y = model(x).argmax(1)  # clean accuracy 1 by construction
    eps = 0.05
    x_adv = Perturber(model, "pgd", eps, AttackSettings(steps=10))(x, y)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert clean_accuracy(model, x, y, 16) == 1.0
    assert robust_accuracy(model, "pgd", eps, x, y, 16, AttackSettings(steps=10)) < 1.0
    assert robust_accuracy(model, "fgsm", 0.0, x, y, 16, AttackSettings()) == 1.0


def test_cw_only_counts_perturbations_within_the_l2_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4)).eval()
    x, _ = batch(32)
    y = model(x).argmax(1)
    settings = AttackSettings(cw_steps=30)
    assert robust_accuracy(model, "cw", 1e-6, x, y, 16, settings) == 1.0
    assert robust_accuracy(model, "cw", 1.0, x, y, 16, settings) < 1.0


def test_robust_evaluation_refuses_a_model_in_training_mode():
    model = small_net().train()
    x, y = batch()
    with pytest.raises(RuntimeError, match="eval mode"):
        robust_accuracy(model, "fgsm", 0.1, x, y, 8, AttackSettings())
    with pytest.raises(RuntimeError, match="eval mode"):
        clean_accuracy(model, x, y, 8)


@pytest.mark.parametrize("attack", ATTACKS.names())
def test_every_registered_attack_runs(attack):
    model = small_net().eval()
    x, y = batch(8)
    stats = running_stats(model)
    settings = AttackSettings(steps=2, cw_steps=5, square_queries=20, num_classes=4)
    acc = robust_accuracy(model, attack, 0.3, x, y, 4, settings)
    assert 0.0 <= acc <= clean_accuracy(model, x, y, 4)
    assert all(torch.equal(v, stats[k]) for k, v in running_stats(model).items())
    assert not any(m.training for m in model.modules())
