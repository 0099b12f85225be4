"""RobustNorm's leaner autograd Function against the implementation it replaced.

``trainables.norms._RobustNormFn`` was rewritten for a faster ResNet-20 training step
(fewer small ops around the same passes; ``benchmarks/bench_step.py``). Its numerics must
not change: the previous Function is kept here, verbatim but for names, as the reference,
and both are run on the same inputs, weights and upstream gradients in every statistic
mode, on both kernel paths, with and without affine parameters: outputs, gradients with
respect to input, weight and bias, and running statistics must agree to float tolerance
(and the range gradient must reach the same elements when extrema are tied). Also:
``gradcheck`` in float64, a forward + backward under CPU autocast (bfloat16), input
gradients through ``torch.func.functional_call``, and a torchattacks PGD attack, which
needs exactly those input gradients.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainables.norms import KERNEL_PATHS, RobustNorm, force_kernel_path, kernel_path

MODES = ("train", "batch", "mixed", "tracked")
SHAPES = [(16, 5), (6, 4, 5, 7)]  # 2-d (N, C) and 4-d (N, C, H, W)

# ----------------------------------------------------------------------------------------
# The previous implementation (trainables/norms.py before the rewrite), the reference.

_BN_BACKWARD = torch.ops.aten.native_batch_norm_backward.default


def _as_ncl(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], x.shape[1], -1)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _per_channel(v: Tensor, ndim: int) -> Tensor:
    return v.view((1, -1) + (1,) * (ndim - 2))


def _prev_channel_mean(x3: Tensor, path: str) -> Tensor:
    if path == "fused":
        return x3.sum(dim=2).sum(dim=0).div_(x3.shape[0] * x3.shape[2])
    return x3.mean(dim=(0, 2), dtype=_acc_dtype(x3.dtype))


def _prev_normalize(x, mean, s, weight, bias, path):
    if path == "fused":
        return torch.batch_norm(x, weight, bias, mean, s * s, False, 0.0, 0.0, False)
    acc = mean.dtype
    scale = 1.0 / s if weight is None else weight.to(acc) / s
    y = (x.to(acc) - _per_channel(mean, x.dim())) * _per_channel(scale, x.dim())
    if bias is not None:
        y = y + _per_channel(bias.to(acc), x.dim())
    return y.to(x.dtype)


def _prev_normalize_grad_sums(g3, x3, mean, s, path):
    if path == "fused":
        _, g_xhat, sum_g = _BN_BACKWARD(g3, x3, None, mean, s * s, None, None, False, 0.0, [False, True, True])
        return g_xhat, sum_g
    acc = mean.dtype
    g = g3.to(acc)
    sum_g = g.sum(dim=(0, 2))
    return (g * (x3.to(acc) - mean.view(1, -1, 1))).sum(dim=(0, 2)) / s, sum_g


class _PreviousRobustNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, fixed_mean, power, eps, running=None):
        path = kernel_path(x, weight, bias, fixed_mean)
        x3 = _as_ncl(x)
        batch_mean = fixed_mean is None
        acc = x.dtype if path == "fused" else _acc_dtype(x.dtype)
        mu = _prev_channel_mean(x3, path) if batch_mean else fixed_mean.to(acc)
        hi, hi_n = x3.amax(dim=2).max(dim=0)
        lo, lo_n = x3.amin(dim=2).min(dim=0)
        r = hi.to(acc) - lo.to(acc)
        s = r.pow(power) + eps
        y = _prev_normalize(x, mu, s, weight, bias, path)
        ctx.save_for_backward(x, weight, mu, s, r, hi_n, lo_n)
        ctx.power, ctx.batch_mean, ctx.has_bias, ctx.path = power, batch_mean, bias is not None, path
        if running is not None:
            running_mean, running_range, momentum = running
            running_mean.lerp_(mu.to(running_mean.dtype), momentum)
            running_range.lerp_(r.to(running_range.dtype), momentum)
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight, mu, s, r, hi_n, lo_n = ctx.saved_tensors
        path = ctx.path
        x3, g3 = _as_ncl(x), _as_ncl(g)
        g_xhat, sum_g = _prev_normalize_grad_sums(g3, x3, mu, s, path)
        mean_g = sum_g / (x3.shape[0] * x3.shape[2]) if ctx.batch_mean else torch.zeros_like(sum_g)
        acc = mu.dtype
        gx = _prev_normalize(g3 if path == "fused" else g3.to(acc), mean_g, s, weight, None, path)
        p = ctx.power
        w_g_xhat = g_xhat if weight is None else weight.to(acc) * g_xhat
        g_r = torch.where(r > 0, r.pow(p - 1) * w_g_xhat / s * -p, 0.0)
        channels = torch.arange(r.numel(), device=r.device)
        hi_l = x3[hi_n, channels].argmax(dim=1)
        lo_l = x3[lo_n, channels].argmin(dim=1)
        gx.index_put_((hi_n, channels, hi_l), g_r.to(gx.dtype), accumulate=True)
        gx.index_put_((lo_n, channels, lo_l), g_r.neg().to(gx.dtype), accumulate=True)
        g_weight = g_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        g_bias = sum_g.to(weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx.view_as(x).to(x.dtype), g_weight, g_bias, None, None, None, None


class PreviousRobustNorm(RobustNorm):
    """RobustNorm's module with the previous Function (and its unchanged eval-mode ``tracked`` pass)."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and self.stats_mode == "tracked":
            return super().forward(x)
        fixed_mean = self.running_mean if (not self.training and self.stats_mode == "mixed") else None
        running = (self.running_mean, self.running_range, self.momentum) if self.training else None
        y = _PreviousRobustNormFn.apply(x, self.weight, self.bias, fixed_mean, self.power, self.eps, running)
        if self.training:
            self.num_batches_tracked.add_(1)
        return y


def as_previous(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose RobustNorm layers run the previous implementation."""
    twin = copy.deepcopy(module)
    for m in twin.modules():
        if type(m) is RobustNorm:
            m.__class__ = PreviousRobustNorm
    return twin


# ----------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _layer(shape, mode: str, dtype: torch.dtype, affine: bool = True, power: float = 0.3) -> RobustNorm:
    """A RobustNorm with random affine parameters and trained running statistics, in ``mode``."""
    layer = RobustNorm(shape[1], power=power, momentum=0.3, affine=affine).to(dtype).train()
    if affine:
        with torch.no_grad():
            layer.weight.uniform_(0.5, 1.5)
            layer.bias.uniform_(-0.5, 0.5)
    for _ in range(2):
        layer(torch.randn(shape, dtype=dtype) * 2 + 0.5)
    if mode != "train":
        layer.eval().stats_mode = mode
    return layer


def _run(layer: nn.Module, x: Tensor, g: Tensor) -> list[Tensor]:
    """Output, gradients of input (and weight, bias), running statistics after the call."""
    xr = x.clone().requires_grad_()
    y = layer(xr)
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    grads = torch.autograd.grad(y, [xr, *params], g)
    return [y.detach(), *grads, layer.running_mean.clone(), layer.running_range.clone(), layer.num_batches_tracked]


def _assert_same(new: list[Tensor], old: list[Tensor], dtype: torch.dtype) -> None:
    names = ["output", "grad input", "grad weight", "grad bias", "running mean", "running range", "batches"]
    if len(new) == 5:  # no affine parameters
        names = [names[0], names[1], *names[4:]]
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for name, a, b in zip(names, new, old, strict=True):
        scale = max(b.abs().max().item(), 1.0) if b.is_floating_point() else 1
        torch.testing.assert_close(a, b, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=["2d", "4d"])
def test_matches_the_previous_implementation(shape, mode, path, affine, dtype):
    layer = _layer(shape, mode, dtype, affine)
    previous = as_previous(layer)
    for step in range(2):  # a second call sees the running statistics the first one moved
        x = torch.randn(shape, dtype=dtype) * 3 - 1 + step
        g = torch.randn(shape, dtype=dtype)
        with force_kernel_path(path):
            _assert_same(_run(layer, x, g), _run(previous, x, g), dtype)


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("mode", MODES)
def test_non_contiguous_inputs_match_the_previous_implementation(layout, path, mode):
    """The fused path writes into a tensor it allocates like the input: other layouts than NCHW too."""
    layer = _layer((6, 4, 5, 7), mode, torch.float32)
    previous = as_previous(layer)
    base = torch.randn(6, 4, 5, 7) * 3 - 1
    if layout == "channels_last":
        x = base.contiguous(memory_format=torch.channels_last)
    else:
        x = base.transpose(2, 3).contiguous().transpose(2, 3)  # same values, H and W strides swapped
    assert not x.is_contiguous() and torch.equal(x, base)
    g = torch.randn(6, 4, 5, 7)
    with force_kernel_path(path):
        new, old = _run(layer, x, g), _run(previous, x, g)
    _assert_same(new, old, torch.float32)


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("mode", ["train", "batch", "mixed"])
def test_tied_extrema_send_the_range_gradient_to_the_same_elements(path, mode):
    """Integer inputs: every channel's max and min occur many times; the subgradient must pick the same ones."""
    layer = _layer((8, 3, 4, 4), mode, torch.float64, power=0.5)
    previous = as_previous(layer)
    x = torch.randint(-3, 4, (8, 3, 4, 4)).double()
    x[:, 2] = 1.0  # and a constant channel: range 0, no range gradient
    g = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    with force_kernel_path(path):
        new, old = _run(layer, x, g), _run(previous, x, g)
    _assert_same(new, old, torch.float64)
    # the range gradient is what differs between tie-breaking rules: it sits on single elements
    torch.testing.assert_close(new[1], old[1], rtol=0, atol=1e-14)
    assert torch.isfinite(new[1]).all()


@pytest.mark.parametrize("path", KERNEL_PATHS)
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_in_float64(path, mode):
    layer = _layer((5, 3, 2, 3), mode, torch.float64)
    x = (torch.randn(5, 3, 2, 3, dtype=torch.float64) * 2).requires_grad_()
    w, b = (p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias))

    def f(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x,))

    with force_kernel_path(path):
        assert torch.autograd.gradcheck(f, (x, w, b), eps=1e-6, atol=1e-7)


def _conv_net(norm: Callable[[int], nn.Module]) -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        norm(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        norm(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 36, 4),
    )


def test_forward_and_backward_under_cpu_autocast():
    """bfloat16 convolutions feeding RobustNorm (float32 parameters): the generic path; finite, and as before."""
    net = _conv_net(RobustNorm).train()
    previous = as_previous(net)
    x, y = torch.rand(32, 3, 6, 6), torch.randint(0, 4, (32,))
    grads = []
    for model in (net, previous):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            assert out.dtype == torch.bfloat16
            loss = F.cross_entropy(out, y)
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for new, old in zip(*grads, strict=True):
        assert torch.isfinite(new).all()
        torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-5 * old.abs().max().item())
    for a, b in zip(net.buffers(), previous.buffers(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("mode", ["batch", "mixed", "tracked"])
def test_input_gradients_through_functional_call(mode):
    """What an attack asks for: d loss / d input, with the parameters passed functionally."""
    net = _conv_net(RobustNorm).train()
    for _ in range(2):
        net(torch.rand(16, 3, 6, 6))
    net.eval()
    for m in net.modules():
        if isinstance(m, RobustNorm):
            m.stats_mode = mode
    previous = as_previous(net)
    x, y = torch.rand(16, 3, 6, 6), torch.randint(0, 4, (16,))
    input_grads = []
    for model in (net, previous):
        params = {k: v.detach() for k, v in model.named_parameters()}
        xr = x.clone().requires_grad_()
        loss = F.cross_entropy(torch.func.functional_call(model, params, (xr,)), y)
        input_grads.append(torch.autograd.grad(loss, xr)[0])
    assert input_grads[0].abs().sum() > 0
    torch.testing.assert_close(input_grads[0], input_grads[1], rtol=1e-5, atol=1e-7)


def test_pgd_attack_finds_the_same_adversarial_examples():
    from trainables.attacks import AttackSettings, Perturber

    net = _conv_net(RobustNorm).train()
    for _ in range(2):
        net(torch.rand(16, 3, 6, 6))
    net.eval()
    for m in net.modules():
        if isinstance(m, RobustNorm):
            m.stats_mode = "batch"
    previous = as_previous(net)
    x, y = torch.rand(16, 3, 6, 6), torch.randint(0, 4, (16,))
    adversarial = []
    for model in (net, previous):
        torch.manual_seed(7)  # PGD's random start
        adversarial.append(Perturber(model, "pgd", 8 / 255, AttackSettings(steps=5, num_classes=4))(x, y))
    assert (adversarial[0] - x).abs().max() <= 8 / 255 + 1e-6
    assert not torch.equal(adversarial[0], x)
    torch.testing.assert_close(adversarial[0], adversarial[1], rtol=0, atol=1e-6)
