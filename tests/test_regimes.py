"""Regimes: which parameters change, which do not, and what each step does to statistics."""

from __future__ import annotations

import pytest
import torch

from trainables.checkpoints import save_checkpoint
from trainables.config import TrialConfig
from trainables.failures import TrialConfigError
from trainables.models import create_model
from trainables.norms import is_norm_layer, norm_layer_factory, norm_parameters
from trainables.optim import build_optimizer
from trainables.regimes import REGIMES


def make_model(norm: str = "batchnorm", model: str = "cnn"):
    torch.manual_seed(0)
    return create_model(
        model, num_classes=4, in_channels=1, norm_layer=norm_layer_factory(norm), mean=[0.5], std=[0.25]
    )


def data():
    g = torch.Generator().manual_seed(3)
    return torch.rand(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)


def train_steps(model, cfg: TrialConfig, steps: int = 2, load_init: bool = True):
    regime = REGIMES[cfg.regime]
    params = regime.prepare(model, cfg, load_init=load_init)
    opt = build_optimizer(params, cfg)
    loss_fn = regime.make_loss(model, cfg)
    x, y = data()
    for _ in range(steps):
        regime.set_train_mode(model)
        loss, logits = loss_fn(x, y)
        assert logits.shape == (16, 4) and torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return regime


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def cfg_for(regime: str, **kw) -> TrialConfig:
    return TrialConfig(regime=regime, train_eps=0.1, train_steps=2, weight_decay=0.0, **kw)


@pytest.mark.parametrize("regime", ["standard", "pgd_at", "fgsm_at", "trades"])
def test_full_regimes_train_every_parameter(regime):
    model = make_model()
    before = snapshot(model)
    train_steps(model, cfg_for(regime))
    for name, p in model.named_parameters():
        assert not torch.equal(p, before[name]), f"{name} did not change under {regime}"


@pytest.mark.parametrize("norm", ["batchnorm", "robustnorm"])
def test_bn_only_adv_trains_only_norm_parameters(norm):
    model = make_model(norm)
    before = snapshot(model)
    regime = train_steps(model, cfg_for("bn_only_adv", norm=norm))
    norm_names = {n for n, _ in norm_parameters(model)}
    assert norm_names, "the model has norm parameters"
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == (name in norm_names), f"{name}: changed={changed}"
        assert p.requires_grad == (name in norm_names)
    # frozen parts stay in eval mode while norm layers train (running statistics follow the data)
    regime.set_train_mode(model)
    for m in model.modules():
        assert m.training == is_norm_layer(m)
    stats = [k for k in before if k.endswith(("running_mean",))]
    assert stats and all(not torch.equal(model.state_dict()[k], before[k]) for k in stats)


def test_bn_finetune_adv_starts_from_the_checkpoint_and_moves_only_norm_parameters(tmp_path):
    trained = make_model()
    train_steps(trained, cfg_for("standard"), steps=3)
    path = save_checkpoint({"model": trained.state_dict(), "epoch": 3}, tmp_path / "standard.pt")
    start = snapshot(trained)

    model = make_model()  # different random init
    assert not torch.equal(model.state_dict()["1.features.0.0.weight"], start["1.features.0.0.weight"])
    train_steps(model, cfg_for("bn_finetune_adv", init_from=str(path)))
    norm_names = {n for n, _ in norm_parameters(model)}
    for name, p in model.named_parameters():
        assert torch.equal(p, start[name]) == (name not in norm_names), name


def test_bn_finetune_adv_errors_name_the_problem_and_are_not_retried(tmp_path):
    """Missing, foreign and unreadable init_from files fail the same way on every retry."""
    missing = tmp_path / "nope.pt"
    with pytest.raises(TrialConfigError, match="nope.pt"):
        REGIMES["bn_finetune_adv"].prepare(make_model(), cfg_for("bn_finetune_adv", init_from=str(missing)))
    other = make_model(model="resnet20")
    path = save_checkpoint({"model": other.state_dict()}, tmp_path / "resnet.pt")
    with pytest.raises(TrialConfigError, match="does not fit"):
        REGIMES["bn_finetune_adv"].prepare(make_model(), cfg_for("bn_finetune_adv", init_from=str(path)))
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(TrialConfigError, match="not a readable"):
        REGIMES["bn_finetune_adv"].prepare(make_model(), cfg_for("bn_finetune_adv", init_from=str(junk)))
    listed = tmp_path / "list.pt"
    torch.save([1, 2], listed)
    with pytest.raises(TrialConfigError, match="holds a list"):
        REGIMES["bn_finetune_adv"].prepare(make_model(), cfg_for("bn_finetune_adv", init_from=str(listed)))


@pytest.mark.parametrize(("dtype", "full_precision"), [(torch.float16, True), (torch.bfloat16, False)])
def test_adversarial_examples_are_made_in_full_precision_under_float16_autocast(dtype, full_precision):
    """torchattacks' gradient of an unscaled float16 loss underflows: float16 autocast is off while
    attacking, bfloat16 (float32's range) stays on."""
    seen = []
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    model.register_forward_hook(lambda *_: seen.append(torch.is_autocast_enabled("cpu")))
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    loss_fn = REGIMES["pgd_at"].make_loss(model, cfg_for("pgd_at"))
    with torch.autocast("cpu", dtype=dtype):
        loss_fn(x, y)
    attack_forwards, training_forward = seen[:-1], seen[-1]
    assert attack_forwards and all(enabled is not full_precision for enabled in attack_forwards)
    assert training_forward  # the training forward itself stays under autocast


@pytest.mark.parametrize(("regime", "forwards"), [("standard", 1), ("pgd_at", 1), ("fgsm_at", 1), ("trades", 2)])
def test_only_training_forwards_update_running_statistics(regime, forwards):
    """Adversarial examples are made in eval mode: a PGD step moves statistics once, not per attack step."""
    model = make_model()
    train_steps(model, cfg_for(regime), steps=3)
    counts = {k: int(v) for k, v in model.state_dict().items() if k.endswith("num_batches_tracked")}
    assert counts and set(counts.values()) == {3 * forwards}


def test_config_rejects_inconsistent_regimes(tmp_path):
    with pytest.raises(ValueError, match="init_from"):
        TrialConfig(regime="bn_finetune_adv")
    with pytest.raises(ValueError, match="norm"):
        TrialConfig(regime="bn_only_adv", norm="none")
    with pytest.raises(ValueError, match="norm_affine"):
        TrialConfig(regime="bn_only_adv", norm_affine=False)
    with pytest.raises(ValueError, match="only used by"):
        TrialConfig(regime="standard", init_from=str(tmp_path / "x.pt"))
