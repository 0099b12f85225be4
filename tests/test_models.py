"""Tests for trainables/models.py: registry, shapes, gradients, norm_layer use,
parameter counts against published figures, init, and InputNormalization."""

from __future__ import annotations

import functools
import inspect

import pytest
import torch
from torch import nn

from trainables import models
from trainables.models import MODELS, InputNormalization, create_model
from trainables.registry import UnknownNameError

EXPECTED_NAMES = {"cnn", "resnet20", "resnet32", "resnet56", "preact_resnet18", "vgg11", "vgg16", "wrn28_10"}
BIG = {"wrn28_10"}  # ~36.5M parameters: only exercised at small inputs


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny batches gain nothing from more threads; on a busy 2-core machine the extra
    OpenMP threads only spin-wait (measured: ~6x the CPU time). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(name: str, in_channels: int = 3, num_classes: int = 10, norm_layer=nn.BatchNorm2d) -> nn.Module:
    torch.manual_seed(0)
    return create_model(name, num_classes=num_classes, in_channels=in_channels, norm_layer=norm_layer)


def build_meta(name: str, norm_layer=nn.BatchNorm2d) -> nn.Module:
    """Build on the meta device: structure and shapes only, no memory, fast."""
    with torch.device("meta"):
        return create_model(name, num_classes=10, in_channels=3, norm_layer=norm_layer)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def forward_backward(model: nn.Module, shape: tuple[int, ...], num_classes: int) -> None:
    model.train()
    x = torch.rand(*shape)
    out = model(x)
    assert out.shape == (shape[0], num_classes)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.arange(shape[0]) % num_classes).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
    # the loss really reaches the first layer
    first = next(p for p in model.parameters() if p.dim() == 4)
    assert first.grad.abs().sum() > 0


def test_registry_has_exactly_the_documented_names():
    assert set(MODELS.names()) == EXPECTED_NAMES
    assert MODELS.kind == "model"


@pytest.mark.parametrize("name", MODELS.names())
def test_forward_backward_grey_8x8(name):
    forward_backward(build(name, in_channels=1, num_classes=7), (2, 1, 8, 8), 7)


@pytest.mark.parametrize("name", [n for n in MODELS.names() if n not in BIG])
def test_forward_backward_rgb_32x32(name):
    forward_backward(build(name, in_channels=3, num_classes=10), (2, 3, 32, 32), 10)


def test_big_model_rgb_small_input():
    # wrn28_10 with 3 channels: one forward + backward at 12x12 (not 32x32: too slow here)
    forward_backward(build("wrn28_10", in_channels=3, num_classes=10), (2, 3, 12, 12), 10)


@pytest.mark.parametrize("name", ["cnn", "resnet20", "vgg11"])
def test_non_square_and_odd_inputs(name):
    model = build(name, in_channels=3, num_classes=5)
    for shape in [(2, 3, 8, 13), (2, 3, 9, 9)]:
        model.zero_grad()
        forward_backward(model, shape, 5)


def test_vgg_pool_is_noop_on_1x1_maps():
    pool = models.HalvingMaxPool()
    x = torch.randn(2, 4, 1, 1)
    assert torch.equal(pool(x), x)
    assert pool(torch.randn(2, 4, 8, 8)).shape == (2, 4, 4, 4)
    assert pool(torch.randn(2, 4, 1, 6)).shape == (2, 4, 1, 3)
    # vgg16 has five pools: 8 -> 4 -> 2 -> 1 -> 1 -> 1
    feats = build("vgg16").features
    assert feats(torch.rand(2, 3, 8, 8)).shape == (2, 512, 1, 1)
    assert feats(torch.rand(2, 3, 32, 32)).shape == (2, 512, 1, 1)


# published figures for 10 classes, 3 input channels, BatchNorm (He et al. 2016,
# Zagoruyko & Komodakis 2016, the PreAct ResNet-18 of Rice et al. 2020)
@pytest.mark.parametrize(
    "name, published, rel_tol",
    [
        ("resnet20", 0.27e6, 0.03),
        ("resnet32", 0.46e6, 0.03),
        ("resnet56", 0.85e6, 0.03),
        ("preact_resnet18", 11.17e6, 0.01),
        ("wrn28_10", 36.48e6, 0.005),
    ],
)
def test_parameter_counts_match_published(name, published, rel_tol):
    count = n_params(build_meta(name))
    assert abs(count - published) / published < rel_tol, f"{name}: {count} parameters"


def test_vgg_and_cnn_parameter_counts():
    # conv stacks of VGG-A / VGG-D plus BatchNorm plus Linear(512, 10)
    assert n_params(build_meta("vgg11")) == 9_228_362
    assert n_params(build_meta("vgg16")) == 14_724_042
    assert n_params(build_meta("cnn")) == (3 * 9 * 32 + 64) + (32 * 9 * 64 + 128) + (64 * 9 * 128 + 256) + (
        128 * 10 + 10
    )


@pytest.mark.parametrize("name", MODELS.names())
def test_norm_layer_factory_is_what_builds_every_norm(name):
    created: list[int] = []

    def recording(num_channels: int) -> nn.Module:
        created.append(num_channels)
        return nn.BatchNorm2d(num_channels)

    model = build_meta(name, norm_layer=recording)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(created) > 0
    assert len(created) == len(bns)
    assert sorted(created) == sorted(m.num_features for m in bns)
    # no norm layer is created behind the factory's back
    assert not any(isinstance(m, (nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)) for m in model.modules())

    plain = build_meta(name, norm_layer=lambda c: nn.Identity())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in plain.modules())
    assert plain(torch.rand(2, 3, 8, 8, device="meta")).shape == (2, 10)


@pytest.mark.parametrize("name", MODELS.names())
def test_partial_factory_kwargs_reach_every_norm(name):
    model = build_meta(name, norm_layer=functools.partial(nn.BatchNorm2d, momentum=0.5))
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.5 for m in bns)


@pytest.mark.parametrize("name", ["cnn", "resnet20", "vgg11"])
def test_groupnorm_trains(name):
    gn = build(name, norm_layer=functools.partial(nn.GroupNorm, 8))
    assert any(isinstance(m, nn.GroupNorm) for m in gn.modules())
    forward_backward(gn, (2, 3, 8, 8), 10)


def test_norm_layers_only_see_4d_conv_maps():
    seen: list[int] = []

    class Probe(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append(x.dim())
            return x

    for name in MODELS.names():
        build_meta(name, norm_layer=lambda c: Probe())(torch.rand(2, 3, 8, 8, device="meta"))
    assert seen and set(seen) == {4}


def test_no_norm_specific_branching_in_models():
    src = inspect.getsource(models)
    forbidden_list = ("norm ==", "norm_layer ==", "norm_layer is", "_BatchNorm", "nn.BatchNorm2d(", "nn.GroupNorm(")
    for forbidden in forbidden_list:
        assert forbidden not in src, forbidden


def test_init_kaiming_fan_out_and_norm_left_alone():
    class HalfNorm(nn.BatchNorm2d):
        def __init__(self, c: int) -> None:
            super().__init__(c)
            nn.init.constant_(self.weight, 0.5)
            nn.init.constant_(self.bias, 0.25)

    model = build("resnet56", norm_layer=HalfNorm)
    norms = [m for m in model.modules() if isinstance(m, HalfNorm)]
    assert all(torch.all(m.weight == 0.5) and torch.all(m.bias == 0.25) for m in norms)
    big = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() > 10_000]
    assert big
    for conv in big:
        fan_out = conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]
        expected = (2.0 / fan_out) ** 0.5
        assert conv.weight.std().item() == pytest.approx(expected, rel=0.1)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(torch.all(m.bias == 0) for m in linears)


def test_input_normalization_formula_and_buffers():
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    norm = InputNormalization(mean, std)
    x = torch.rand(4, 3, 5, 6)
    expected = torch.stack([(x[:, c] - mean[c]) / std[c] for c in range(3)], dim=1)
    assert torch.allclose(norm(x), expected, atol=1e-6)
    state = norm.state_dict()
    assert set(state) == {"mean", "std"}
    assert torch.allclose(state["std"].flatten(), torch.tensor(std))
    assert list(norm.parameters()) == []  # not trained
    double = norm.to(torch.float64)
    assert double.mean.dtype == torch.float64 and double.std.dtype == torch.float64


def test_create_model_prepends_input_normalization():
    mean, std = [0.5], [0.25]
    wrapped = create_model("cnn", num_classes=3, in_channels=1, norm_layer=nn.BatchNorm2d, mean=mean, std=std)
    assert isinstance(wrapped, nn.Sequential) and isinstance(wrapped[0], InputNormalization)
    assert "0.mean" in wrapped.state_dict() and "0.std" in wrapped.state_dict()
    wrapped.eval()
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(wrapped(x), wrapped[1]((x - 0.5) / 0.25), atol=1e-6)
    bare = create_model("cnn", num_classes=3, in_channels=1, norm_layer=nn.BatchNorm2d)
    assert not any(isinstance(m, InputNormalization) for m in bare.modules())


@pytest.mark.parametrize(
    "mean, std, match",
    [
        ([0.5, 0.5], [0.2, 0.2, 0.2], "mean has 2"),
        ([0.5, 0.5], [0.2, 0.2], "3 input channels"),
        ([0.5, 0.5, 0.5, 0.5], [0.2, 0.2, 0.2, 0.2], "3 input channels"),
        ([0.5, 0.5, 0.5], [0.2, 0.0, 0.2], "std must be > 0"),
        ([0.5, 0.5, 0.5], [0.2, -1.0, 0.2], "std must be > 0"),
        ([0.5, 0.5, 0.5], None, "both mean and std"),
    ],
)
def test_bad_mean_std_raise_value_error(mean, std, match):
    with pytest.raises(ValueError, match=match):
        create_model("cnn", num_classes=10, in_channels=3, norm_layer=nn.BatchNorm2d, mean=mean, std=std)


def test_input_normalization_rejects_bad_values():
    with pytest.raises(ValueError):
        InputNormalization([0.5, 0.5], [0.2])
    with pytest.raises(ValueError):
        InputNormalization([0.5], [0.0])


def test_unknown_model_name_lists_known_names():
    with pytest.raises(UnknownNameError) as info:
        create_model("resnet999", num_classes=10, in_channels=3, norm_layer=nn.BatchNorm2d)
    message = str(info.value)
    assert "resnet999" in message
    for name in EXPECTED_NAMES:
        assert name in message
    assert isinstance(info.value, ValueError) and isinstance(info.value, KeyError)
