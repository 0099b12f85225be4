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
from collections.abc import Callable, Iterable, Iterator
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


_BN_INTO = torch.ops.aten.native_batch_norm.out
_BN_BACKWARD = torch.ops.aten.native_batch_norm_backward.default

# --- kernel paths ---------------------------------------------------------------------
# RobustNorm's per-channel passes can run on batch norm's own kernels ("fused"): the
# forward as eval-mode ``batch_norm`` with variance ``s ** 2`` and eps 0, the backward's
# reductions as ``native_batch_norm_backward`` in eval mode with no saved statistics.
# That backward call is only valid on the CPU: PyTorch's CUDA kernel requires the saved
# mean and inverse std whenever weight or bias gradients are asked for (docs/design.md,
# known traps), and half precision would overflow or underflow ``s ** 2``. Everywhere
# else RobustNorm takes the "generic" path: plain broadcasting ops that autograd's own
# formulas would use, with per-channel statistics accumulated in at least float32.
KERNEL_PATHS = ("fused", "generic")
_FUSED_DTYPES = (torch.float32, torch.float64)
_forced_path: str | None = None


def fused_path_valid(device_type: str, dtypes: Iterable[torch.dtype]) -> bool:
    """Whether batch norm's CPU kernels may stand in: CPU tensors, all float32 or all float64."""
    dtypes = set(dtypes)
    return device_type == "cpu" and len(dtypes) == 1 and dtypes <= set(_FUSED_DTYPES)


def kernel_path(x: Tensor, *per_channel: Tensor | None) -> str:
    """``fused`` where ``fused_path_valid``, else ``generic``; ``force_kernel_path`` overrides."""
    given = [t for t in per_channel if t is not None]
    valid = fused_path_valid(x.device.type, [x.dtype, *(t.dtype for t in given)]) and all(
        t.device == x.device for t in given
    )
    dtype, device = x.dtype, x.device
    if _forced_path is None:
        return "fused" if valid else "generic"
    if _forced_path == "fused" and not valid:
        raise RuntimeError(
            f"the fused kernel path was forced, but it is not valid for {dtype} on {device.type} "
            f"(only CPU tensors, all float32 or all float64)"
        )
    return _forced_path


@contextmanager
def force_kernel_path(path: str | None) -> Iterator[None]:
    """Inside the block, RobustNorm takes ``path`` (``fused``/``generic``; None: automatic).

    For tests and benchmarks: every path is checked on the CPU by forcing it. Forcing
    ``fused`` where it is not valid is an error, never a silent wrong gradient.
    """
    global _forced_path
    if path is not None and path not in KERNEL_PATHS:
        raise ValueError(f"unknown kernel path {path!r}; known: {', '.join(KERNEL_PATHS)}")
    saved, _forced_path = _forced_path, path
    try:
        yield
    finally:
        _forced_path = saved


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-channel statistics of half and bfloat16 inputs are kept in float32."""
    return torch.promote_types(dtype, torch.float32)


def _per_channel(v: Tensor, ndim: int) -> Tensor:
    return v.view((1, -1) + (1,) * (ndim - 2))


def _channel_stats(x3: Tensor, fixed_mean: Tensor | None, path: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per channel of (N, C, L): ``mu`` (the mean, or ``fixed_mean``) and ``r = max - min`` in the
    statistics dtype, and the first sample holding the max (``hi_n``) and the min (``lo_n``).

    Max and min go over the contiguous last dim first, then over N: fast vectorized passes
    (a max/min with indices over L, or ``torch.aminmax``, is several times slower), exact in
    any dtype. fused: the mean is summed the same way (whole training steps measured 10-20%
    faster than with one reduction over (0, 2), two threads, ResNet-20 shapes), in x's
    dtype. generic: one reduction accumulated in at least float32.
    """
    hi, hi_n = x3.amax(dim=2).max(dim=0)
    lo, lo_n = x3.amin(dim=2).min(dim=0)
    if path == "fused":
        r = hi - lo
        if fixed_mean is None:
            return x3.sum(dim=2).sum(dim=0).div_(x3.shape[0] * x3.shape[2]), r, hi_n, lo_n
        return fixed_mean.to(r.dtype), r, hi_n, lo_n
    acc = _acc_dtype(x3.dtype)
    r = hi.to(acc) - lo.to(acc)
    mu = x3.mean(dim=(0, 2), dtype=acc) if fixed_mean is None else fixed_mean.to(acc)
    return mu, r, hi_n, lo_n


def _normalize(
    x: Tensor,
    mean: Tensor,
    s: Tensor,
    var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    out: Tensor | None = None,
) -> Tensor:
    """``(x - mean) / s * weight + bias`` per channel of (N, C, *), in x's dtype.

    fused (``var = s * s`` given): batch norm's eval-mode kernel with variance ``var`` and
    eps 0 (its ``1 / sqrt(s ** 2)`` is ``1 / s`` up to rounding), written into ``out``
    (``torch.empty_like(x)`` allocated by the caller, see ``_RobustNormFn``) or a fresh
    tensor: one pass, about twice as fast on the CPU as broadcasting ops. generic (``var`` None):
    ``(x - mean) * (weight / s) + bias`` in the statistics dtype, cast back to x's dtype,
    a fresh tensor.
    """
    if var is not None and out is None:
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, 0.0, False)
    if var is not None:
        _BN_INTO(
            x, weight, bias, mean, var, False, 0.0, 0.0, out=out, save_mean=x.new_empty(0), save_invstd=x.new_empty(0)
        )
        return out
    acc = mean.dtype
    scale = 1.0 / s if weight is None else weight.to(acc) / s
    y = (x.to(acc) - _per_channel(mean, x.dim())) * _per_channel(scale, x.dim())
    if bias is not None:
        y = y + _per_channel(bias.to(acc), x.dim())
    return y.to(x.dtype)


def _normalize_grad_sums(g3: Tensor, x3: Tensor, mean: Tensor, s: Tensor, var: Tensor | None) -> tuple[Tensor, Tensor]:
    """Per channel of (N, C, L): ``sum(g * (x - mean)) / s`` and ``sum(g)``, in the statistics dtype.

    fused (``var`` given): one pass of batch norm's eval-mode backward reduction (its
    weight and bias gradients). generic: two reductions over broadcasting ops, (x - mean)
    formed first so a large mean cannot cancel the sum.
    """
    if var is not None:
        _, g_xhat, sum_g = _BN_BACKWARD(g3, x3, None, mean, var, None, None, False, 0.0, [False, True, True])
        return g_xhat, sum_g
    acc = mean.dtype
    g = g3.to(acc)
    sum_g = g.sum(dim=(0, 2))
    return (g * (x3.to(acc) - mean.view(1, -1, 1))).sum(dim=(0, 2)) / s, sum_g


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without a dispatcher call when it already is."""
    return t if t.dtype == dtype else t.to(dtype)


class _RobustNormFn(torch.autograd.Function):
    """RobustNorm with a hand-written backward.

    Computes per channel, over (N, L) of the (N, C, L) input::

        mu = mean (or ``fixed_mean`` when given), r = max - min, s = r ** p + eps
        y  = (x - mu) / s * w + b

    Forward is three vectorized reductions (max, min, sum) and one pass; backward one
    reduction and one pass, with as few small ops around them as will do (in a training
    step with two threads, every serial op between two parallel passes is time the other
    thread idles). Which kernels run the passes is chosen per call (``kernel_path``):
    batch norm's own on the CPU in float32/float64, broadcasting ops everywhere else.

    On the fused path the large result (the output in forward, the input gradient in
    backward) is allocated first, before the small per-channel tensors, as batch norm's
    own kernels do. Allocated last, it came from another place in glibc's heap, which
    then gave more of its free top back to the kernel during every step: a ResNet-20
    training step page-faulted about 26,000 times against ``nn.BatchNorm2d``'s 11,000
    (two threads, each network in its own process, medians of five), at several
    microseconds a fault on a VM as much as RobustNorm's whole layer-level saving; in this
    order about 9,000 times (``benchmarks/bench_step.py`` prints faults per step).

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
        path = kernel_path(x, weight, bias, fixed_mean)
        y = torch.empty_like(x) if path == "fused" else None  # first: see the class docstring
        mu, r, hi_n, lo_n = _channel_stats(_as_ncl(x), fixed_mean, path)
        s = r.pow(power).add_(eps)
        var = s * s if path == "fused" else None  # batch norm's kernels divide by sqrt(var)
        y = _normalize(x, mu, s, var, weight, bias, out=y)
        ctx.save_for_backward(x, weight, mu, s, var, r, hi_n, lo_n)
        ctx.power, ctx.batch_mean, ctx.has_bias = power, fixed_mean is None, bias is not None
        if running is not None:
            running_mean, running_range, momentum = running
            running_mean.lerp_(_cast(mu, running_mean.dtype), momentum)
            running_range.lerp_(_cast(r, running_range.dtype), momentum)
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, weight, mu, s, var, r, hi_n, lo_n = ctx.saved_tensors
        x3, g3 = _as_ncl(x), _as_ncl(g)
        gx = torch.empty_like(g3) if var is not None else None  # first: see the class docstring
        g_xhat, sum_g = _normalize_grad_sums(g3, x3, mu, s, var)  # sum(g * xhat), xhat = (x - mu) / s
        mean_g = sum_g / (x3.shape[0] * x3.shape[2]) if ctx.batch_mean else torch.zeros_like(sum_g)
        gx = _normalize(_cast(g3, mu.dtype), mean_g, s, var, weight, None, out=gx)  # (g - mean(g)) * w / s
        # through the range: d loss / d r = d loss / d s * p * r ** (p - 1), d loss / d s = -w * sum(g * xhat) / s;
        # none for a constant channel (r = 0, where r ** (p - 1) may be inf)
        p = ctx.power
        w_g_xhat = g_xhat if weight is None else _cast(weight, mu.dtype) * g_xhat
        g_r = r.pow(p - 1).mul_(w_g_xhat).div_(s).mul_(-p).masked_fill_(r <= 0, 0.0)
        g_r = _cast(g_r, gx.dtype)
        channels = torch.arange(r.numel(), device=r.device)
        hi_l = x3[hi_n, channels].argmax(dim=1)
        lo_l = x3[lo_n, channels].argmin(dim=1)
        gx.index_put_((hi_n, channels, hi_l), g_r, accumulate=True)
        gx.index_put_((lo_n, channels, lo_l), g_r.neg(), accumulate=True)
        g_weight = _cast(g_xhat, weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        g_bias = _cast(sum_g, weight.dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return _cast(gx.view_as(x), x.dtype), g_weight, g_bias, None, None, None, None


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
            # one affine pass with per-channel scale and shift, valid on every device
            inv = 1.0 / (self.running_range.pow(self.power) + self.eps)
            scale = inv if self.weight is None else self.weight * inv
            shift = -self.running_mean * scale if self.bias is None else self.bias - self.running_mean * scale
            y = torch.addcmul(_per_channel(shift, x.dim()), x, _per_channel(scale, x.dim()))
            return y.to(x.dtype)  # half inputs with float32 buffers (autocast) stay half
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
        # mixed: broadcasting ops (valid on every device), statistics in float32 or wider
        acc = _acc_dtype(x.dtype)
        xa = x.to(acc)
        dims = [0] + list(range(2, x.dim()))
        var = xa.var(dim=dims, unbiased=False)
        y = (xa - _per_channel(self.running_mean.to(acc), x.dim())) * _per_channel(torch.rsqrt(var + self.eps), x.dim())
        if self.affine:
            y = y * _per_channel(self.weight.to(acc), x.dim()) + _per_channel(self.bias.to(acc), x.dim())
        return y.to(x.dtype)

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
