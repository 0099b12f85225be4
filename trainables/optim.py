"""Optimizers and learning-rate schedules, as registries.

Schedules are per-step multipliers of the peak ``lr`` (a ``LambdaLR``), with an
optional linear warm-up, so a trial resumed mid-run continues on exactly the same curve.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from trainables.registry import Registry

if TYPE_CHECKING:
    from trainables.config import TrialConfig

OptimizerBuilder = Callable[[Iterable[nn.Parameter], "TrialConfig"], torch.optim.Optimizer]
# (progress in epochs, cfg) -> multiplier of the peak lr, before warm-up
Schedule = Callable[[float, "TrialConfig"], float]

OPTIMIZERS: Registry[OptimizerBuilder] = Registry(
    "optimizer",
    {
        "sgd": lambda params, c: torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay),
        "sgd_nesterov": lambda params, c: torch.optim.SGD(
            params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.momentum > 0
        ),
        "adam": lambda params, c: torch.optim.Adam(
            params, lr=c.lr, betas=(c.momentum, 0.999), weight_decay=c.weight_decay
        ),
        "adamw": lambda params, c: torch.optim.AdamW(
            params, lr=c.lr, betas=(c.momentum, 0.999), weight_decay=c.weight_decay
        ),
    },
)

LR_SCHEDULES: Registry[Schedule] = Registry(
    "lr_schedule",
    {
        "constant": lambda t, c: 1.0,
        "cosine": lambda t, c: 0.5 * (1.0 + math.cos(math.pi * min(t / c.epochs, 1.0))),
        "step": lambda t, c: c.lr_gamma ** sum(t >= m for m in c.lr_milestones),
        "linear": lambda t, c: max(0.0, 1.0 - t / c.epochs),
    },
)


def build_optimizer(params: Iterable[nn.Parameter], cfg: TrialConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over ``params``."""
    return OPTIMIZERS[cfg.optimizer](params, cfg)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrialConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` following ``cfg.lr_schedule`` after ``cfg.warmup_epochs`` of warm-up."""
    schedule = LR_SCHEDULES[cfg.lr_schedule]

    def factor(step: int) -> float:
        t = step / steps_per_epoch
        warm = min(1.0, (t + 1.0 / steps_per_epoch) / cfg.warmup_epochs) if cfg.warmup_epochs > 0 else 1.0
        return warm * schedule(t, cfg)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
