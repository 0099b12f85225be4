"""Norm layers against reference formulas written here, in every statistic mode."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from trainables.norms import (
    NORMS,
    BatchNorm,
    RobustNorm,
    create_norm_layer,
    norm_layer_factory,
    norm_parameters,
    set_stats_mode,
    stats_mode,
)
from trainables.registry import UnknownNameError

SHAPES = [(16, 5), (6, 4, 5, 7)]  # 2-d (N, C) and 4-d (N, C, H, W)


def _dims(x):
    return [0] + list(range(2, x.dim()))


def _view(v, x):
    return v.view((1, -1) + (1,) * (x.dim() - 2))


def ref_robustnorm(x, w, b, power, eps, mean=None, rng=None):
    """y = (x - mu) / (range ** p + eps) * w + b, batch statistics unless given."""
    mu = x.mean(_dims(x)) if mean is None else mean
    r = (x.amax(_dims(x)) - x.amin(_dims(x))) if rng is None else rng
    return (x - _view(mu, x)) / _view(r.pow(power) + eps, x) * _view(w, x) + _view(b, x)


def ref_batchnorm(x, w, b, eps, mean=None, var=None):
    """y = (x - mu) / sqrt(var + eps) * w + b, biased batch variance unless given."""
    mu = x.mean(_dims(x)) if mean is None else mean
    v = x.var(_dims(x), unbiased=False) if var is None else var
    return (x - _view(mu, x)) / torch.sqrt(_view(v, x) + eps) * _view(w, x) + _view(b, x)


def _randomise_affine(layer):
    with torch.no_grad():
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    return layer


def _compare(layer, x, reference, atol=1e-10):
    """Outputs and gradients (input, weight, bias) of layer vs autograd of reference."""
    x1 = x.clone().requires_grad_()
    y1 = layer(x1)
    g = torch.randn_like(y1)
    grads1 = torch.autograd.grad(y1, [x1, layer.weight, layer.bias], g)
    x2 = x.clone().requires_grad_()
    w2 = layer.weight.detach().clone().requires_grad_()
    b2 = layer.bias.detach().clone().requires_grad_()
    y2 = reference(x2, w2, b2)
    grads2 = torch.autograd.grad(y2, [x2, w2, b2], g)
    torch.testing.assert_close(y1, y2, atol=atol, rtol=1e-9)
    for name, a, r in zip(("input", "weight", "bias"), grads1, grads2):
        torch.testing.assert_close(a, r, atol=atol, rtol=1e-8, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("power", [0.2, 0.5, 1.0])
def test_robustnorm_training_matches_formula(shape, power):
    layer = _randomise_affine(RobustNorm(shape[1], power=power, momentum=0.3).double()).train()
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    _compare(layer, x, lambda x, w, b: ref_robustnorm(x, w, b, power, 1e-5))


@pytest.mark.parametrize("shape", SHAPES)
def test_robustnorm_running_statistics(shape):
    m = 0.3
    layer = RobustNorm(shape[1], momentum=m).double().train()
    mean, rng = torch.zeros(shape[1], dtype=torch.float64), torch.ones(shape[1], dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
        layer(x)
        mean = (1 - m) * mean + m * x.mean(_dims(x))
        rng = (1 - m) * rng + m * (x.amax(_dims(x)) - x.amin(_dims(x)))
    torch.testing.assert_close(layer.running_mean, mean)
    torch.testing.assert_close(layer.running_range, rng)
    assert int(layer.num_batches_tracked) == 3


def _trained(layer_cls, shape, **kwargs):
    layer = _randomise_affine(layer_cls(shape[1], **kwargs).double()).train()
    for _ in range(3):
        layer(torch.randn(shape, dtype=torch.float64) * 2 + 0.5)
    return layer.eval()


@pytest.mark.parametrize("shape", SHAPES)
def test_robustnorm_eval_modes_match_formula(shape):
    layer = _trained(RobustNorm, shape, power=0.3)
    x = torch.randn(shape, dtype=torch.float64) * 4 - 1  # shifted: modes must differ
    rm, rr = layer.running_mean.clone(), layer.running_range.clone()
    refs = {
        "tracked": lambda x, w, b: ref_robustnorm(x, w, b, 0.3, 1e-5, mean=rm, rng=rr),
        "batch": lambda x, w, b: ref_robustnorm(x, w, b, 0.3, 1e-5),
        "mixed": lambda x, w, b: ref_robustnorm(x, w, b, 0.3, 1e-5, mean=rm),
    }
    outputs = {}
    for mode, ref in refs.items():
        layer.stats_mode = mode
        _compare(layer, x, ref)
        outputs[mode] = layer(x)
    torch.testing.assert_close(layer.running_mean, rm)  # eval never updates statistics
    assert not torch.allclose(outputs["tracked"], outputs["batch"])
    assert not torch.allclose(outputs["mixed"], outputs["batch"])


@pytest.mark.parametrize("shape", SHAPES)
def test_batchnorm_training_and_running_statistics(shape):
    m = 0.2
    layer = _randomise_affine(BatchNorm(shape[1], momentum=m).double()).train()
    x = torch.randn(shape, dtype=torch.float64) * 3 + 1
    _compare(layer, x, lambda x, w, b: ref_batchnorm(x, w, b, 1e-5))
    layer.reset_running_stats()
    layer(x)
    n = x.numel() // shape[1]
    torch.testing.assert_close(layer.running_mean, m * x.mean(_dims(x)))
    torch.testing.assert_close(layer.running_var, (1 - m) + m * x.var(_dims(x), unbiased=False) * n / (n - 1))


@pytest.mark.parametrize("shape", SHAPES)
def test_batchnorm_eval_modes_match_formula(shape):
    layer = _trained(BatchNorm, shape)
    x = torch.randn(shape, dtype=torch.float64) * 4 - 1
    rm, rv = layer.running_mean.clone(), layer.running_var.clone()
    refs = {
        "tracked": lambda x, w, b: ref_batchnorm(x, w, b, 1e-5, mean=rm, var=rv),
        "batch": lambda x, w, b: ref_batchnorm(x, w, b, 1e-5),
        "mixed": lambda x, w, b: ref_batchnorm(x, w, b, 1e-5, mean=rm),
    }
    for mode, ref in refs.items():
        layer.stats_mode = mode
        _compare(layer, x, ref)
    torch.testing.assert_close(layer.running_mean, rm)
    torch.testing.assert_close(layer.running_var, rv)


def test_robustnorm_without_affine_and_float32_gradcheck():
    layer = RobustNorm(3, affine=False).double()
    assert layer.weight is None and not list(layer.parameters())
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(layer(x), ref_robustnorm(x, torch.ones(3), torch.zeros(3), 0.2, 1e-5))
    assert torch.autograd.gradcheck(layer, (x,))
    x32 = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(RobustNorm(3)(x32), ref_robustnorm(x32, torch.ones(3), torch.zeros(3), 0.2, 1e-5))


def test_robustnorm_constant_channel_has_finite_gradient():
    layer = RobustNorm(2).double()
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    x[:, 1] = 0.7  # range 0: y = 0 / eps, the range gradient must not be inf * 0
    x.requires_grad_()
    layer(x).sum().backward()
    assert torch.isfinite(x.grad).all()


def test_switching_modes_of_a_whole_model_reuses_weights():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), RobustNorm(4), nn.ReLU(), nn.Conv2d(4, 4, 3), BatchNorm(4))
    model.train()
    for _ in range(3):
        model(torch.randn(8, 1, 8, 8))
    model.eval()
    x = torch.randn(8, 1, 8, 8) + 1.0
    params = [p.data_ptr() for p in model.parameters()]
    tracked = model(x)
    with stats_mode(model, "batch"):
        assert [m.stats_mode for m in (model[1], model[4])] == ["batch", "batch"]
        batch = model(x)
    assert [m.stats_mode for m in (model[1], model[4])] == ["tracked", "tracked"]
    assert not torch.allclose(tracked, batch)
    set_stats_mode(model, "mixed")
    assert model[1].stats_mode == model[4].stats_mode == "mixed"
    assert [p.data_ptr() for p in model.parameters()] == params
    with pytest.raises(ValueError, match="statistic mode"):
        set_stats_mode(model, "frozen")


@pytest.mark.parametrize("name", NORMS.names())
@pytest.mark.parametrize("shape", [(8, 16), (4, 16, 5, 5)])
def test_every_registered_norm_builds_and_runs(name, shape):
    layer = create_norm_layer(name, 16)
    x = torch.randn(shape, requires_grad=True)
    for mode in (layer.train, layer.eval):
        mode()
        y = layer(x)
        assert y.shape == x.shape and torch.isfinite(y).all()
        y.square().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
        x.grad = None
    expected = NORMS[name].factory.keywords.get("stats_mode") if hasattr(NORMS[name].factory, "keywords") else None
    if expected:
        assert layer.stats_mode == expected


def test_registry_names_and_options():
    assert set(NORMS.names()) == {
        "batchnorm",
        "batchnorm_batchstats",
        "batchnorm_mixed",
        "robustnorm",
        "robustnorm_batchstats",
        "robustnorm_mixed",
        "groupnorm",
        "layernorm",
        "instancenorm",
        "none",
    }
    rn = create_norm_layer("robustnorm_mixed", 8, power=0.4, momentum=0.05, eps=1e-3, affine=False)
    assert (rn.power, rn.momentum, rn.eps, rn.affine, rn.stats_mode) == (0.4, 0.05, 1e-3, False, "mixed")
    assert create_norm_layer("groupnorm", 48, groups=32).num_groups == 16
    assert create_norm_layer("instancenorm", 6).num_groups == 6
    assert create_norm_layer("layernorm", 6).num_groups == 1
    with pytest.raises(TypeError, match="power"):
        norm_layer_factory("batchnorm", power=0.2)
    with pytest.raises(UnknownNameError, match="known: batchnorm"):
        create_norm_layer("batchnrom", 8)


def test_norm_parameters_finds_only_norm_affines():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), RobustNorm(4), nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4), nn.Linear(4, 2))
    names = [n for n, _ in norm_parameters(model)]
    assert names == ["1.weight", "1.bias", "3.weight", "3.bias"]
