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


def _extreme(x3: Tensor, largest: bool) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel max (or min) of (N, C, L) with the (n, l) position of one extremum."""
    vals, l_idx = x3.max(dim=2) if largest else x3.min(dim=2)
    best, n_idx = vals.max(dim=0) if largest else vals.min(dim=0)
    l_idx = l_idx.gather(0, n_idx.unsqueeze(0)).squeeze(0)
    return best, n_idx, l_idx


class _RobustNormFn(torch.autograd.Function):
    """RobustNorm with a hand-written backward (two fused passes instead of autograd's many).

    Computes per channel, over (N, L) of the (N, C, L) input::

        mu = mean (or ``fixed_mean`` when given), r = max - min, s = r ** p + eps
        y  = x * (w / s) + (b - mu * w / s)

    The gradient through ``r`` reaches the arg-max and arg-min elements (one each per
    channel, the subgradient autograd would also pick when there are no ties).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, fixed_mean, power: float, eps: float):  # type: ignore[override]
        x3 = _as_ncl(x)
        batch_mean = fixed_mean is None
        mu = x3.mean(dim=(0, 2)) if batch_mean else fixed_mean
        hi, hi_n, hi_l = _extreme(x3, largest=True)
        lo, lo_n, lo_l = _extreme(x3, largest=False)
        r = hi - lo
        inv = 1.0 / (r.pow(power) + eps)
        scale = inv if weight is None else weight * inv
        shift = -mu * scale if bias is None else bias - mu * scale
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = torch.addcmul(shift.view(shape), x, scale.view(shape))
        ctx.save_for_backward(x, weight, mu, inv, r, hi_n, hi_l, lo_n, lo_l)
        ctx.power, ctx.batch_mean, ctx.has_bias = power, batch_mean, bias is not None
        stats = torch.stack([mu, r]).detach()
        ctx.mark_non_differentiable(stats)
        return y, stats

    @staticmethod
    def backward(ctx, g, _g_stats):  # type: ignore[override]
        x, weight, mu, inv, r, hi_n, hi_l, lo_n, lo_l = ctx.saved_tensors
        x3, g3 = _as_ncl(x), _as_ncl(g)
        count = x3.shape[0] * x3.shape[2]
        sum_g = g3.sum(dim=(0, 2))
        # sum(g * xhat) per channel, with xhat = (x - mu) * inv
        sum_g_xhat = ((g3 * x3).sum(dim=(0, 2)) - mu * sum_g) * inv
        w = torch.ones_like(inv) if weight is None else weight
        a = w * inv  # dy/dx at fixed statistics
        c = -a * sum_g / count if ctx.batch_mean else torch.zeros_like(a)
        gx = torch.addcmul(c.view(1, -1, 1), g3, a.view(1, -1, 1)).contiguous()  # fresh (N, C, L)
        # d loss / d range = d loss / d s * p * r^(p - 1), with d loss / d s = -w * inv * sum_g_xhat
        p = ctx.power
        safe_r = torch.where(r > 0, r, torch.ones_like(r))
        g_r = torch.where(r > 0, -a * sum_g_xhat * p * safe_r.pow(p - 1), torch.zeros_like(r))
        channels = torch.arange(g_r.numel(), device=g_r.device)
        gx.index_put_((hi_n, channels, hi_l), g_r, accumulate=True)
        gx.index_put_((lo_n, channels, lo_l), -g_r, accumulate=True)
        g_weight = sum_g_xhat if weight is not None and ctx.needs_input_grad[1] else None
        g_bias = sum_g if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx.view_as(x), g_weight, g_bias, None, None, None


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
        y, stats = _RobustNormFn.apply(x, self.weight, self.bias, fixed_mean, self.power, self.eps)
        if self.training:
            with torch.no_grad():
                self.running_mean.lerp_(stats[0], self.momentum)
                self.running_range.lerp_(stats[1], self.momentum)
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
