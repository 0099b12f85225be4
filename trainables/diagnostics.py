"""Per-layer shift diagnostic (Awais et al., 2020): how far an attack moves what each norm layer sees.

Awais et al. argue that adversarial inputs shift the distribution at every normalization
layer, so the statistics a layer tracked during training are wrong at attack time. This
module measures that shift per layer. For a norm layer with per-channel input ``x`` (the
tensor entering the layer, shape (N, C, *)), over a fixed set of test samples:

- ``mu_c`` and ``var_c``: mean and biased variance of channel ``c`` over every sample and
  position, once for the clean samples and once for the same samples under the attack;
- ``s_c``: the scale the layer divides by with its tracked statistics, i.e. its tracked
  mode's denominator: ``sqrt(running_var_c + eps)`` for BatchNorm, ``running_range_c **
  power + eps`` for RobustNorm;
- ``mean shift = (1 / C) * sum_c |mu_adv_c - mu_clean_c| / s_c``,
  ``var shift = (1 / C) * sum_c |var_adv_c - var_clean_c| / s_c ** 2``.

A mean shift of 0.5 says that, averaged over channels, the attack moved a channel's mean by
half the scale the layer normalizes with: after normalization, the adversarial batch sits
about 0.5 off where the tracked statistics put the clean one.

Which layers: those that keep running statistics (BatchNorm and RobustNorm, in any
statistic mode; the tracked statistics are the reference in every mode, so modes compare).
GroupNorm, LayerNorm and InstanceNorm are left out on purpose: they normalize each sample
by that sample's own statistics, so there is no stored statistic for an attack to make
wrong (the mechanism measured here does not exist in them), and no scale of theirs to
measure a shift against.

Measuring runs in eval mode (each module's own flag restored afterwards), with forward
pre-hooks that exist only during the clean and adversarial measuring forwards (never
during the attack's own forwards) and are removed even on error, under ``no_grad``, in
near-equal evaluation batches (``eval_batches``: statistics are merged over all batches,
not averaged per batch). No running statistic changes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from trainables.attacks import eval_mode
from trainables.data import eval_batches
from trainables.metrics import SHIFT_PREFIX
from trainables.norms import RobustNorm

SHIFT_KINDS = ("mean", "var")
AVERAGE = "avg"
SHIFT_AVERAGES = tuple(f"{SHIFT_PREFIX}{kind}_{AVERAGE}" for kind in SHIFT_KINDS)  # shift_mean_avg, shift_var_avg
MAX_SHIFT_SAMPLES = 512  # test samples the trial's diagnostic measures on (fewer if final_adv_samples says so)

Perturb = Callable[[Tensor, Tensor], Tensor]
"""``perturb(x, y) -> x_adv``, e.g. an ``attacks.Perturber``."""


@dataclass(frozen=True)
class LayerShift:
    """The shift of one norm layer's input: ``name`` is the short layer name (``l01_features.0.1``)."""

    name: str
    mean: float
    var: float


def has_tracked_statistics(module: nn.Module) -> bool:
    """Whether ``module`` normalizes with running statistics (BatchNorm, RobustNorm)."""
    if isinstance(module, RobustNorm):
        return True
    return isinstance(module, _BatchNorm) and module.running_mean is not None and module.running_var is not None


def tracked_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{short name: layer}`` for every layer with running statistics, in module order.

    The short name is ``l<i>_<module path>`` with ``i`` counting from 1 in the order the
    layers are registered (input to output for every model in ``models``), zero-padded so
    that names sort by depth: ``l01_features.0.1``, ``l02_features.1.1``, ...
    """
    found = [(path, m) for path, m in model.named_modules() if has_tracked_statistics(m)]
    width = max(2, len(str(len(found))))
    return {f"l{i:0{width}d}_{path or 'model'}": m for i, (path, m) in enumerate(found, start=1)}


def normalizing_scale(layer: nn.Module) -> Tensor:
    """Per-channel ``s_c`` the layer divides by with its tracked statistics (float64, CPU)."""
    if isinstance(layer, RobustNorm):
        return layer.running_range.detach().double().cpu().pow(layer.power) + layer.eps
    if isinstance(layer, _BatchNorm):
        return (layer.running_var.detach().double().cpu() + layer.eps).sqrt()
    raise TypeError(f"{type(layer).__name__} keeps no running statistics")


class ChannelMoments:
    """Per-channel count, mean and biased variance of every tensor ``add``-ed, merged exactly.

    Each batch's mean and variance are taken on its device (float32 or wider), then merged
    into float64 totals on the CPU with Chan et al.'s pairwise formula, so the result is the
    statistics of all batches together, whatever their sizes.
    """

    def __init__(self) -> None:
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None  # sum of squared deviations from the mean

    def add(self, x: Tensor) -> None:
        x3 = x.detach().reshape(x.shape[0], x.shape[1], -1)
        x3 = x3.to(torch.promote_types(x3.dtype, torch.float32))
        var_b, mean_b = torch.var_mean(x3, dim=(0, 2), correction=0)
        n_b = x3.shape[0] * x3.shape[2]
        mean_b, m2_b = mean_b.double().cpu(), var_b.double().cpu() * n_b
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.count + n_b
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (self.count * n_b / n)
        self.count = n

    @property
    def var(self) -> Tensor:
        if self.m2 is None:
            raise ValueError("no input recorded")
        return self.m2 / self.count


@contextmanager
def recording(layers: dict[str, nn.Module], moments: dict[str, ChannelMoments]) -> Iterator[None]:
    """Inside the block, every forward call of a layer adds its input to ``moments[name]``.

    The hooks are removed when the block ends, also on error.
    """
    handles = []

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            moments.setdefault(name, ChannelMoments()).add(args[0])

        return hook

    try:
        for name, layer in layers.items():
            handles.append(layer.register_forward_pre_hook(hook_for(name)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def measure_shift(model: nn.Module, perturb: Perturb, x: Tensor, y: Tensor, batch_size: int) -> list[LayerShift]:
    """Mean and variance shift (module doc) of each tracked norm layer's input, clean vs ``perturb``.

    ``(x, y)`` is split into near-equal batches of at most ``batch_size`` (never a batch of
    one); each batch is perturbed, then the clean and the adversarial batch are run once
    each with the layers' inputs recorded. The model is measured in eval mode; every
    module's training flag and every buffer are as before afterwards. Layers that saw no
    input are left out; a model without tracked layers gives ``[]``.
    """
    layers = tracked_layers(model)
    if not layers:
        return []
    clean: dict[str, ChannelMoments] = {}
    adv: dict[str, ChannelMoments] = {}
    with eval_mode(model):
        for s in eval_batches(len(x), batch_size):
            x_adv = perturb(x[s], y[s])
            with torch.no_grad():
                with recording(layers, clean):
                    model(x[s])
                with recording(layers, adv):
                    model(x_adv)
    out = []
    for name, layer in layers.items():
        if name not in clean:
            continue
        scale = normalizing_scale(layer)
        c, a = clean[name], adv[name]
        out.append(
            LayerShift(
                name,
                mean=float(((a.mean - c.mean).abs() / scale).mean()),
                var=float(((a.var - c.var).abs() / scale.square()).mean()),
            )
        )
    return out


def shift_metric(kind: str, layer: str) -> str:
    """Metric name, e.g. ``shift_mean_l01_features.0.1``; ``layer="avg"``: the average over layers."""
    if kind not in SHIFT_KINDS:
        raise ValueError(f"unknown shift kind {kind!r}; known: {', '.join(SHIFT_KINDS)}")
    return f"{SHIFT_PREFIX}{kind}_{layer}"


def shift_metrics(shifts: list[LayerShift]) -> dict[str, float]:
    """Per-layer ``shift_mean_<layer>`` / ``shift_var_<layer>`` and their averages ``shift_*_avg``."""
    if not shifts:
        return {}
    out: dict[str, float] = {}
    for s in shifts:
        out[shift_metric("mean", s.name)] = s.mean
        out[shift_metric("var", s.name)] = s.var
    out[shift_metric("mean", AVERAGE)] = sum(s.mean for s in shifts) / len(shifts)
    out[shift_metric("var", AVERAGE)] = sum(s.var for s in shifts) / len(shifts)
    return out


def shifts_from_metrics(metrics: dict[str, float]) -> list[LayerShift]:
    """The per-layer shifts in a metrics dict (averages left out), in depth order.

    Only names ``shift_metrics`` writes are read; a layer with only one of its two metrics
    gets NaN for the other.
    """
    by_layer: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        for kind in SHIFT_KINDS:
            prefix = f"{SHIFT_PREFIX}{kind}_"
            layer = key[len(prefix) :] if key.startswith(prefix) else ""
            if layer and layer != AVERAGE:
                by_layer.setdefault(layer, {})[kind] = float(value)
    return [
        LayerShift(name, by_layer[name].get("mean", math.nan), by_layer[name].get("var", math.nan))
        for name in sorted(by_layer)
    ]
