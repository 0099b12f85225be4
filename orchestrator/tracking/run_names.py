"""Readable MLflow run names for trials: what varies in the search, e.g. ``robustnorm pgd_at p=0.31 seed 0``.

A name is the trial's norm and regime, then the value of every other key that varies in
the search (its grid and sampled keys, in file order, ``seed`` last), with short labels
for common knobs (``norm_power`` -> ``p``, ``weight_decay`` -> ``wd``, ...) and numbers in
at most three significant digits; a conditional key only where its ``when`` holds. Registry names that read well alone (model, dataset,
optimizer) are shown bare. Repeats of the same configuration (``num_samples`` > 1 over a
grid) end with the Ray trial number (``#3``); ``MlflowTrialTracker`` numbers any other
name another trial of the search already holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.searchfile.space import SearchSpace, matches

ALWAYS = ("norm", "regime")
LAST = ("seed",)
BARE = frozenset({"model", "dataset", "optimizer", "lr_schedule"})
LABELS = {
    "norm_power": "p",
    "norm_momentum": "norm_mom",
    "norm_groups": "groups",
    "weight_decay": "wd",
    "momentum": "mom",
    "train_eps": "eps",
    "train_alpha": "alpha",
    "train_steps": "steps",
    "trades_beta": "beta",
    "batch_size": "bs",
    "epochs": "ep",
    "warmup_epochs": "warmup",
    "lr_gamma": "gamma",
    "train_subset": "n_train",
}
_UNSAFE = re.compile(r"[\"'`\\\s]+")  # quotes would break MLflow filter strings; blanks separate parts


def varying_keys(keys: Iterable[str]) -> tuple[str, ...]:
    """The keys a name shows after norm and regime: ``keys`` (grid, then sampled) in order, ``seed`` last."""
    ordered = list(dict.fromkeys(k for k in keys if k not in ALWAYS))
    return tuple([k for k in ordered if k not in LAST] + [k for k in ordered if k in LAST])


def format_value(value: Any) -> str:
    """Compact text of one knob value: ``0.31``, ``5e-4``, ``3``, ``true``, ``fgsm,pgd``."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e6:
            return str(int(value))
        plain = f"{value:.3g}"
        mantissa, _, exponent = f"{value:.2e}".partition("e")
        mantissa = mantissa.rstrip("0").rstrip(".")
        scientific = f"{mantissa}e{int(exponent)}"
        return scientific if len(scientific) < len(plain) else plain  # 0.31, 5e-4, 1e12
    if isinstance(value, (list, tuple)):
        return ",".join(format_value(v) for v in value)
    return _UNSAFE.sub("_", str(value)) if value is not None else "none"


def _part(key: str, value: Any) -> str:
    if key == "seed":
        return f"seed {format_value(value)}"
    if key in BARE:
        return format_value(value)
    return f"{LABELS.get(key, key)}={format_value(value)}"


def trial_number(trial_id: str) -> int | None:
    """Ray's trial number from a trial id such as ``b4ef5_00003`` (None if it has none)."""
    match = re.search(r"_(\d+)$", trial_id)
    return int(match.group(1)) if match else None


def numbered(name: str, trial_id: str) -> str:
    """``name`` with the Ray trial number appended (``name #3``), or the trial id if it has no number."""
    number = trial_number(trial_id)
    return f"{name} #{number if number is not None else trial_id}"


def run_name(
    config: dict[str, Any],
    keys: Iterable[str],
    trial_id: str = "",
    *,
    number: bool = False,
    conditions: Mapping[str, dict[str, list[Any]]] | None = None,
) -> str:
    """The run name of a trial with ``config``: norm, regime, then ``keys`` (see the module doc).

    A conditional key (``conditions``: key -> its ``when``) is shown only where its condition
    holds (a batchnorm trial has no ``p``); keys missing from ``config`` (a configuration
    that never validated) are left out.
    """
    conditions = conditions or {}
    shown = [k for k in keys if k in config and matches(conditions.get(k, {}), config)]
    parts = [format_value(config[k]) for k in ALWAYS if config.get(k) is not None]
    parts += [_part(k, config[k]) for k in shown]
    name = " ".join(parts) or "trial"
    return numbered(name, trial_id) if number else name


@dataclass(frozen=True)
class StageNaming:
    """How the runs of one stage are named: ``keys`` and ``run_name``'s keyword ``options``."""

    keys: tuple[str, ...]
    conditions: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    number: bool = False

    @property
    def options(self) -> dict[str, Any]:
        return {"number": self.number, "conditions": self.conditions}


def stage_naming(space: SearchSpace) -> StageNaming:
    """The naming of the runs of a stage whose space is ``space``: what varies in it, the ``when`` of
    conditional keys, and numbers for repeats of one grid point (``num_samples`` > 1, nothing sampled),
    which would otherwise share a name."""
    repeats = space.search.algorithm != "optuna" and space.search.num_samples > 1 and not space.sample
    conditions = {k: key.when for k, key in (*space.grid.items(), *space.sample.items()) if key.when}
    return StageNaming(varying_keys(space.trial_keys()), conditions, repeats)
