"""Normalization layers and the norm-layer registry.

Every norm that a search-space file can name lives in ``NORMS`` and is built with
``create_norm_layer(name, num_features, **options)``; models receive a one-argument
factory from ``norm_layer_factory`` (timm style) and never look at the name.

RobustNorm (Awais et al., 2020) normalizes each channel by a power of its range::

    y = (x - mu) / (range ** power + eps) * weight + bias

with ``mu`` the mean and ``range = max - min`` over every dimension but the channel one
((N,) for 2-d inputs, (N, H, W) for 4-d), and running estimates of both kept with
``momentum`` like BatchNorm's. RobustNorm and BatchNorm have three *statistic modes*
that decide what is used in eval mode (training always uses the batch's statistics):

- ``tracked``: the running mean and running range/variance (RNT, BN),
- ``batch``: the inference batch's own statistics (RN, BNwoT),
- ``mixed``: the running mean with the batch's range/variance (RNM, BNM).

The mode is a plain attribute, so one trained network can be evaluated in every mode
without copying weights: see ``stats_mode`` / ``set_stats_mode``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from trainables.registry import Registry

STATS_MODES = ("tracked", "batch", "mixed")
NormLayer = Callable[[int], nn.Module]


def _check_stats_mode(mode: str) -> str:
    if mode not in STATS_MODES:
        raise ValueError(f"unknown statistic mode {mode!r}; known: {', '.join(STATS_MODES)}")
    return mode


def _as_ncl(x: Tensor) -> Tensor:
    """View (N, C, *) as (N, C, L) so per-channel statistics reduce over dims (0, 2)."""
    if x.dim() < 2:
        raise ValueError(f"expected input of shape (N, C, ...), got {tuple(x.shape)}")
    return x.reshape(x.shape[0], x.shape[1], -1)


_BN_BACKWARD = torch.ops.aten.native_batch_norm_backward.default


def _fast_dtypes(x: Tensor, *per_channel: Tensor | None) -> bool:
    """Whether batch norm's kernels can stand in: float32 or float64 throughout (in half
    precision ``s ** 2`` would overflow or underflow too easily)."""
    return x.dtype in (torch.float32, torch.float64) and all(t is None or t.dtype == x.dtype for t in per_channel)


def _channel_mean(x3: Tensor) -> Tensor:
    """Per-channel mean of (N, C, L) over N and L.

    float32/float64: summed over L first, then over N, like the max and min passes that
    follow (whole RobustNorm training steps measured 10-20% faster than with one
    reduction over (0, 2), two threads, ResNet-20 shapes). Half precision keeps the one
    reduction, whose partial sums are not rounded to half precision.
    """
    if x3.dtype in (torch.float32, torch.float64):
        return x3.sum(dim=2).sum(dim=0).div_(x3.shape[0] * x3.shape[2])
    return x3.mean(dim=(0, 2))


def _normalize(x: Tensor, mean: Tensor, s: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
    """``(x - mean) / s * weight + bias`` per channel of (N, C, *), a fresh tensor.

    Batch norm's eval-mode kernel with variance ``s ** 2`` and eps 0 (its ``1 / sqrt(s ** 2)``
    is ``1 / s`` up to rounding): one fused pass, about twice as fast on the CPU as
    broadcasting ops. Other dtypes, and mixed ones (which that kernel refuses), take
    broadcasting ops with their type promotion.
    """
    if _fast_dtypes(x, mean, s, weight, bias):
        return torch.batch_norm(x, weight, bias, mean, s * s, False, 0.0, 0.0, False)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    y = (x - mean.view(shape)) / s.view(shape)
    if weight is not None:
        y = y * weight.view(shape)
    return y if bias is None else y + bias.view(shape)


def _normalize_grad_sums(g3: Tensor, x3: Tensor, mean: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
    """Per channel of (N, C, L): ``sum(g * (x - mean)) / s`` and ``sum(g)``.

    One pass: batch norm's eval-mode backward reduction (its weight and bias gradients).
    """
    if _fast_dtypes(x3, g3, mean, s):
        _, g_xhat, sum_g = _BN_BACKWARD(g3, x3, None, mean, s * s, None, None, False, 0.0, [False, True, True])
        return g_xhat, sum_g
    sum_g = g3.sum(dim=(0, 2))
    return ((g3 * x3).sum(dim=(0, 2)) - mean * sum_g) / s, sum_g


class _RobustNormFn(torch.autograd.Function):
    """RobustNorm with a hand-written backward.

    Computes per channel, over (N, L) of the (N, C, L) input::

        mu = mean (or ``fixed_mean`` when given), r = max - min, s = r ** p + eps
        y  = (x - mu) / s * w + b

    Forward is three vectorized reductions (mean, max, min) and one fused pass; backward
    one fused reduction and one fused pass (batch norm's own eval-mode kernels, see
    ``_normalize``), with few small ops around them, so little per-call overhead.

    The gradient through ``r`` reaches one arg-max and one arg-min element per channel
    (the first sample holding the extremum, and the first position in it: the
    subgradient autograd would also pick when there are no ties). Backward finds them
    in the one (C, L) row per channel that holds each extremum.

    ``running``, when given, is ``(running_mean, running_range, momentum)``: forward
    moves those buffers towards the batch's ``mu`` and ``r`` in place (passing them in
    saves a second, non-differentiable output and its bookkeeping).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, fixed_mean, power: float, eps: float, running=None):  # type: ignore[override]
        x3 = _as_ncl(x)
        batch_mean = fixed_mean is None
        mu = _channel_mean(x3) if batch_mean else fixed_mean
        # max and min over the contiguous last dim, then over N: fast vectorized passes
        # (a max/min with indices, or torch.aminmax, is several times slower)
        hi, hi_n = x3.amax(dim=2).max(dim=0)
        lo, lo_n = x3.amin(dim=2).min(dim=0)
        r = hi - lo
        s = r.pow(power) + eps
        y = _normalize(x, mu, s, weight, bias)
        ctx.save_for_backward(x, weight, mu, s, r, hi_n, lo_n)
        ctx.power, ctx.batch_mean, ctx.has_bias = power, batch_mean, bias is not None
        if running is not None:
            running_mean, running_range, momentum = running
            running_mean.lerp_(mu, momentum)
            running_range.lerp_(r, momentum)
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, weight, mu, s, r, hi_n, lo_n = ctx.saved_tensors
        x3, g3 = _as_ncl(x), _as_ncl(g)
        g_xhat, sum_g = _normalize_grad_sums(g3, x3, mu, s)  # sum(g * xhat), xhat = (x - mu) / s
        mean_g = sum_g / (x3.shape[0] * x3.shape[2]) if ctx.batch_mean else torch.zeros_like(sum_g)
        gx = _normalize(g3, mean_g, s, weight, None)  # (g - mean(g)) * w / s: fresh (N, C, L)
        # through the range: d loss / d r = d loss / d s * p * r ** (p - 1), d loss / d s = -w * sum(g * xhat) / s
        p = ctx.power
        w_g_xhat = g_xhat if weight is None else weight * g_xhat
        g_r = torch.where(r > 0, r.pow(p - 1) * w_g_xhat / s * -p, 0.0)
        channels = torch.arange(r.numel(), device=r.device)
        hi_l = x3[hi_n, channels].argmax(dim=1)
        lo_l = x3[lo_n, channels].argmin(dim=1)
        gx.index_put_((hi_n, channels, hi_l), g_r, accumulate=True)
        gx.index_put_((lo_n, channels, lo_l), g_r.neg_(), accumulate=True)
        g_weight = g_xhat if weight is not None and ctx.needs_input_grad[1] else None
        g_bias = sum_g if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx.view_as(x), g_weight, g_bias, None, None, None, None


class RobustNorm(nn.Module):
    """Range-based normalization (Awais et al., 2020) for (N, C) and (N, C, *) inputs."""

    def __init__(
        self,
        num_features: int,
        power: float = 0.2,
        momentum: float = 0.1,
        eps: float = 1e-5,
        affine: bool = True,
        stats_mode: str = "tracked",
    ) -> None:
        super().__init__()
        self.num_features, self.power, self.momentum, self.eps = num_features, power, momentum, eps
        self.affine = affine
        self.stats_mode = _check_stats_mode(stats_mode)
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_range", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(f"RobustNorm({self.num_features}) got input of shape {tuple(x.shape)}")
        if not self.training and self.stats_mode == "tracked":
            inv = 1.0 / (self.running_range.pow(self.power) + self.eps)
            scale = inv if self.weight is None else self.weight * inv
            shift = -self.running_mean * scale if self.bias is None else self.bias - self.running_mean * scale
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return torch.addcmul(shift.view(shape), x, scale.view(shape))
        fixed_mean = self.running_mean if (not self.training and self.stats_mode == "mixed") else None
        running = (self.running_mean, self.running_range, self.momentum) if self.training else None
        y = _RobustNormFn.apply(x, self.weight, self.bias, fixed_mean, self.power, self.eps, running)
        if self.training:
            self.num_batches_tracked.add_(1)
        return y

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, power={self.power}, momentum={self.momentum}, eps={self.eps}, "
            f"affine={self.affine}, stats_mode={self.stats_mode}"
        )


class BatchNorm(_BatchNorm):
    """``nn.BatchNorm`` for any (N, C, *) input, with the three statistic modes.

    Training and the ``tracked`` mode are PyTorch's own batch norm; ``batch`` evaluates
    with the batch's mean and biased variance (running estimates untouched); ``mixed``
    with the running mean and the batch's biased variance: ``(x - running_mean) /
    sqrt(var_batch + eps)``.
    """

    def __init__(
        self,
        num_features: int,
        momentum: float = 0.1,
        eps: float = 1e-5,
        affine: bool = True,
        stats_mode: str = "tracked",
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine)
        self.stats_mode = _check_stats_mode(stats_mode)

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected input of shape (N, C, ...), got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        if self.training or self.stats_mode == "tracked":
            return super().forward(x)
        self._check_input_dim(x)
        if self.stats_mode == "batch":
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        dims = [0] + list(range(2, x.dim()))
        var = x.var(dim=dims, unbiased=False)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = (x - self.running_mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", stats_mode={self.stats_mode}"


def _group_norm(num_features: int, groups: int = 32, eps: float = 1e-5, affine: bool = True) -> nn.GroupNorm:
    """GroupNorm with ``gcd(groups, channels)`` groups, so any channel count works."""
    return nn.GroupNorm(math.gcd(groups, num_features), num_features, eps=eps, affine=affine)


def _layer_norm(num_features: int, eps: float = 1e-5, affine: bool = True) -> nn.GroupNorm:
    """LayerNorm of conv features: one group, statistics over (C, H, W) per sample."""
    return nn.GroupNorm(1, num_features, eps=eps, affine=affine)


def _instance_norm(num_features: int, eps: float = 1e-5, affine: bool = True) -> nn.GroupNorm:
    """InstanceNorm: one group per channel, statistics over (H, W) per sample."""
    return nn.GroupNorm(num_features, num_features, eps=eps, affine=affine)


def _no_norm(num_features: int) -> nn.Module:
    return nn.Identity()


@dataclass(frozen=True)
class NormEntry:
    """A registry entry: how to build the layer and which options it takes."""

    factory: Callable[..., nn.Module]
    options: tuple[str, ...]
    has_stats_modes: bool = False


_RN_OPTIONS = ("power", "momentum", "eps", "affine")
_BN_OPTIONS = ("momentum", "eps", "affine")

NORMS: Registry[NormEntry] = Registry(
    "norm",
    {
        "batchnorm": NormEntry(functools.partial(BatchNorm, stats_mode="tracked"), _BN_OPTIONS, True),
        "batchnorm_batchstats": NormEntry(functools.partial(BatchNorm, stats_mode="batch"), _BN_OPTIONS, True),
        "batchnorm_mixed": NormEntry(functools.partial(BatchNorm, stats_mode="mixed"), _BN_OPTIONS, True),
        "robustnorm": NormEntry(functools.partial(RobustNorm, stats_mode="tracked"), _RN_OPTIONS, True),
        "robustnorm_batchstats": NormEntry(functools.partial(RobustNorm, stats_mode="batch"), _RN_OPTIONS, True),
        "robustnorm_mixed": NormEntry(functools.partial(RobustNorm, stats_mode="mixed"), _RN_OPTIONS, True),
        "groupnorm": NormEntry(_group_norm, ("groups", "eps", "affine")),
        "layernorm": NormEntry(_layer_norm, ("eps", "affine")),
        "instancenorm": NormEntry(_instance_norm, ("eps", "affine")),
        "none": NormEntry(_no_norm, ()),
    },
)

NORM_TYPES: tuple[type[nn.Module], ...] = (
    RobustNorm,
    _BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def norm_layer_factory(name: str, **options: object) -> NormLayer:
    """A one-argument ``norm_layer(num_features)`` for models, with ``options`` bound.

    Options that the named norm does not take are an error.
    """
    entry = NORMS[name]
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        allowed = ", ".join(entry.options) or "none"
        raise TypeError(f"norm {name!r} takes no option(s) {', '.join(unknown)}; it takes: {allowed}")
    return functools.partial(entry.factory, **options)


def create_norm_layer(name: str, num_features: int, **options: object) -> nn.Module:
    """Build one norm layer by registry name, e.g. ``create_norm_layer("robustnorm", 64, power=0.3)``."""
    return norm_layer_factory(name, **options)(num_features)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer (its parameters are "norm parameters")."""
    return isinstance(module, NORM_TYPES)


def norm_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """Named parameters that belong to normalization layers (affine weight and bias)."""
    for module_name, module in model.named_modules():
        if is_norm_layer(module):
            for name, param in module.named_parameters(recurse=False):
                yield (f"{module_name}.{name}" if module_name else name), param


def stats_mode_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` that have statistic modes."""
    return [m for m in model.modules() if isinstance(m, (RobustNorm, BatchNorm))]


def set_stats_mode(model: nn.Module, mode: str) -> None:
    """Switch every layer with statistic modes to ``mode`` (``tracked``, ``batch``, ``mixed``)."""
    _check_stats_mode(mode)
    for layer in stats_mode_layers(model):
        layer.stats_mode = mode


@contextmanager
def stats_mode(model: nn.Module, mode: str) -> Iterator[nn.Module]:
    """Evaluate ``model`` with ``mode`` statistics inside the block, then restore each layer's own."""
    layers = stats_mode_layers(model)
    saved = [layer.stats_mode for layer in layers]
    set_stats_mode(model, mode)
    try:
        yield model
    finally:
        for layer, old in zip(layers, saved):
            layer.stats_mode = old
