"""TrialConfig: every knob of one trial, validated before any work starts.

The field names are the flat names used everywhere: ``KEY=VALUE`` overrides on the
command line, keys in search-space files, and MLflow params. Unknown keys are errors
(``extra="forbid"``); registry-valued fields must name a registry entry, and the error
lists the known names. List fields accept a list or a comma-separated string
(``eval_attacks=fgsm,pgd``). Number fields refuse ``true``/``false`` (pydantic alone would take
them as 1 and 0); ``seed`` goes from 0 to ``MAX_SEED``.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Annotated, Any, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from trainables.attacks import ATTACKS
from trainables.data import AUGMENTATIONS, DATASETS
from trainables.models import MODELS
from trainables.norms import NORMS
from trainables.optim import LR_SCHEDULES, OPTIMIZERS
from trainables.problems import MAX_PROBLEMS, clip, problem_lines, short_repr
from trainables.regimes import REGIMES
from trainables.registry import Registry
from trainables.safe_yaml import YamlRefused, YamlSyntaxError, load_yaml_text

Eps = Annotated[float, Field(ge=0.0, le=1.0)]
_FILE_DATASETS = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn", "imagefolder")
_NONE = ("none", "null", "~")
# fields whose value is a registry name
_REGISTRY_FIELDS: dict[str, Registry] = {
    "dataset": DATASETS,
    "model": MODELS,
    "norm": NORMS,
    "regime": REGIMES,
    "optimizer": OPTIMIZERS,
    "lr_schedule": LR_SCHEDULES,
}
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
MAX_SEED = 2**32 - 1  # numpy's generator takes no larger seed; Ray's and Optuna's samplers seed numpy too


def _known(registry: Registry, value: str) -> str:
    if value not in registry:
        raise ValueError(f"unknown {registry.kind} {short_repr(value)}; known: {', '.join(registry.names())}")
    return value


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    if isinstance(value, (int, float)):
        return [value]
    return value


def _leaf_types(annotation: Any) -> set[type]:
    """The plain types inside an annotation (``list[float] | None`` -> {float, NoneType})."""
    args = get_args(annotation)
    if not args:
        return {annotation} if isinstance(annotation, type) else set()
    return set().union(*(_leaf_types(a) for a in args))


@cache
def _number_kind(model: type[BaseModel], name: str) -> str | None:
    """'a whole number' or 'a number' for a field that holds numbers (or lists of them), else None."""
    types = _leaf_types(model.model_fields[name].annotation)
    if bool in types or not types & {int, float}:
        return None
    return "a number" if float in types else "a whole number"


class NumbersNotBooleans(BaseModel):
    """A model whose number fields refuse ``true``/``false``, alone or in a list: pydantic's lax
    mode takes them as 1 and 0, so ``epochs: true`` would train one epoch."""

    @field_validator("*", mode="before")
    @classmethod
    def _not_boolean(cls, value: Any, info: ValidationInfo) -> Any:
        kind = _number_kind(cls, info.field_name) if info.field_name else None
        if kind and any(isinstance(v, bool) for v in (value if isinstance(value, (list, tuple)) else [value])):
            raise ValueError(f"Input should be {kind}, not true or false")
        return value


class TrialConfig(NumbersNotBooleans):
    """One trial: data, model, norm, regime, optimisation, evaluation, run settings."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    # --- data ---------------------------------------------------------------------
    dataset: str = Field("digits", description="dataset name (registry `datasets`)")
    data_dir: str | None = Field(None, description="folder with the dataset files (torchvision datasets, imagefolder)")
    download: bool = Field(False, description="let torchvision download the dataset into data_dir")
    train_subset: int | None = Field(None, gt=0, description="keep a fixed random subset of this many training samples")
    test_subset: int | None = Field(None, gt=0, description="keep a fixed random subset of this many test samples")
    augment: str = Field("auto", description="training augmentation: auto (per dataset) or an augmentation name")

    # --- model and normalization ----------------------------------------------------
    model: str = Field("cnn", description="model name (registry `models`)")
    norm: str = Field("batchnorm", description="normalization layer (registry `norms`)")
    norm_power: float = Field(0.2, gt=0.0, le=2.0, description="RobustNorm: power p of the range")
    norm_momentum: float = Field(0.1, gt=0.0, le=1.0, description="BatchNorm/RobustNorm: running-statistics momentum")
    norm_eps: float = Field(1e-5, gt=0.0, description="norm layers: eps added to the denominator")
    norm_affine: bool = Field(True, description="norm layers: learnable weight and bias")
    norm_groups: int = Field(32, gt=0, description="GroupNorm: groups (reduced to gcd(groups, channels))")

    # --- training regime -------------------------------------------------------------
    regime: str = Field("standard", description="training regime (registry `regimes`)")
    train_eps: Eps = Field(0.1, description="adversarial training: L-inf eps in [0, 1] pixel scale")
    train_alpha: float | None = Field(
        None, gt=0.0, description="adversarial training: step size (default 2.5 * eps / steps; FGSM-RS: 1.25 * eps)"
    )
    train_steps: int = Field(7, gt=0, description="adversarial training: PGD / TRADES steps")
    trades_beta: float = Field(6.0, ge=0.0, description="TRADES: weight of the KL robustness term")
    init_from: str | None = Field(None, description="bn_finetune_adv: checkpoint file to start from")

    # --- optimisation ------------------------------------------------------------------
    optimizer: str = Field("sgd", description="optimizer (registry `optimizers`)")
    lr: float = Field(0.05, gt=0.0, description="peak learning rate")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum / Adam beta1")
    weight_decay: float = Field(5e-4, ge=0.0, description="weight decay")
    lr_schedule: str = Field("cosine", description="learning-rate schedule (registry `lr_schedules`)")
    warmup_epochs: float = Field(0.0, ge=0.0, description="linear warm-up, in epochs")
    lr_milestones: list[float] = Field(
        default_factory=list, description="step schedule: epochs at which lr *= lr_gamma"
    )
    lr_gamma: float = Field(0.1, gt=0.0, description="step schedule: factor at each milestone")
    epochs: int = Field(10, gt=0, description="training epochs")
    batch_size: int = Field(128, ge=2, description="training batch size")
    grad_clip: float | None = Field(None, gt=0.0, description="clip the gradient norm to this value")

    # --- evaluation ----------------------------------------------------------------------
    eval_attacks: list[str] = Field(
        ["fgsm", "pgd"], min_length=1, description="attacks for evaluation (registry `attacks`); the first is primary"
    )
    eval_eps: list[Eps] = Field(
        [0.05, 0.1], min_length=1, description="eps values for evaluation, [0, 1] pixel scale; the first is primary"
    )
    eval_batch_size: int = Field(256, ge=2, description="evaluation batch size (batch statistics depend on it; logged)")
    eval_steps: int = Field(10, gt=0, description="evaluation PGD / PGD-L2 steps")
    epoch_adv_samples: int | None = Field(512, gt=1, description="test samples for the per-epoch adv_acc (None: all)")
    final_adv_samples: int | None = Field(None, gt=1, description="test samples for the final attack sweep (None: all)")
    cw_c: float = Field(1.0, gt=0.0, description="CW: confidence weight c")
    cw_steps: int = Field(50, gt=0, description="CW: optimisation steps")
    square_queries: int = Field(1000, gt=0, description="Square attack: query budget")
    shift_diagnostic: bool = Field(
        False,
        description="after the final sweep, measure how far the primary attack shifts each BatchNorm/RobustNorm layer's input mean and variance (metrics shift_mean_<layer>, shift_var_<layer>, shift_*_avg)",
    )

    # --- run -----------------------------------------------------------------------------
    seed: int = Field(0, ge=0, description=f"random seed, 0 to {MAX_SEED} (2**32 - 1)")
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:N, mps")
    threads: int | None = Field(None, gt=0, description="torch CPU threads (None: torch's default)")
    amp: bool = Field(
        False,
        description="mixed-precision training steps (torch.autocast: bfloat16 on CPU, float16 with a gradient scaler on CUDA); evaluation stays float32",
    )

    @model_validator(mode="before")
    @classmethod
    def _none_strings(cls, data: Any) -> Any:
        """``train_subset=none`` on the command line means None for optional fields."""
        if isinstance(data, dict):
            data = dict(data)
            for key, value in data.items():
                field = cls.model_fields.get(key)
                if field is not None and isinstance(value, str) and value.lower() in _NONE and not field.is_required():
                    if type(None) in getattr(field.annotation, "__args__", ()):
                        data[key] = None
        return data

    @field_validator(*_REGISTRY_FIELDS)
    @classmethod
    def _registered(cls, v: str, info: ValidationInfo) -> str:
        return _known(_REGISTRY_FIELDS[info.field_name], v)

    @field_validator("augment")
    @classmethod
    def _augment(cls, v: str) -> str:
        return v if v == "auto" else _known(AUGMENTATIONS, v)

    @field_validator("eval_attacks", "eval_eps", "lr_milestones", mode="before")
    @classmethod
    def _lists(cls, v: Any) -> Any:
        return _split_list(v)

    @field_validator("eval_attacks")
    @classmethod
    def _attacks(cls, v: list[str]) -> list[str]:
        for name in v:
            _known(ATTACKS, name)
        if len(set(v)) != len(v):
            raise ValueError(f"attacks listed twice: {v}")
        return v

    @field_validator("eval_eps")
    @classmethod
    def _eps_unique(cls, v: list[float]) -> list[float]:
        if len(set(v)) != len(v):
            raise ValueError(f"eps values listed twice: {v}")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if v > MAX_SEED:
            raise ValueError(f"a seed goes from 0 to {MAX_SEED} (2**32 - 1, the most numpy's generator takes)")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError(f"unknown device {short_repr(v)}; use auto, cpu, cuda, cuda:N or mps")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TrialConfig:
        regime = REGIMES[self.regime]
        if regime.from_checkpoint and not self.init_from:
            raise ValueError(
                f"regime {self.regime!r} starts from a trained network: set init_from to a checkpoint file"
            )
        if self.init_from and not regime.from_checkpoint:
            raise ValueError(f"init_from is only used by regimes that start from a checkpoint, not {self.regime!r}")
        if regime.norm_only and (self.norm == "none" or not self.norm_affine):
            raise ValueError(
                f"regime {self.regime!r} trains only norm parameters: it needs a norm other than 'none' with norm_affine=true"
            )
        if self.dataset in _FILE_DATASETS and not self.data_dir:
            raise ValueError(f"dataset {self.dataset!r} reads files: set data_dir")
        if self.lr_schedule == "step" and not self.lr_milestones:
            raise ValueError("lr_schedule 'step' needs lr_milestones (epochs, e.g. 50,75)")
        return self

    # --- derived -----------------------------------------------------------------------
    @property
    def primary_attack(self) -> str:
        return self.eval_attacks[0]

    @property
    def primary_eps(self) -> float:
        return self.eval_eps[0]

    def norm_options(self) -> dict[str, Any]:
        """The ``norm_*`` options that the chosen norm takes, for ``norm_layer_factory``."""
        return {name: getattr(self, f"norm_{name}") for name in NORMS[self.norm].options}

    def differing(self, other: TrialConfig, ignore: tuple[str, ...] = ()) -> list[str]:
        """Names of the fields whose values differ from ``other``'s."""
        return [k for k in type(self).model_fields if k not in ignore and getattr(self, k) != getattr(other, k)]


def is_integer_knob(name: str) -> bool:
    """Whether TrialConfig field ``name`` holds whole numbers (``int`` or ``int | None``)."""
    field = TrialConfig.model_fields.get(name)
    if field is None:
        return False
    types = get_args(field.annotation) or (field.annotation,)
    return int in types and float not in types


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["a=1", "b=x,y"]`` -> ``{"a": 1, "b": "x,y"}``: values are read as YAML scalars.

    A malformed pair, or a value the bounded YAML reader refuses (deep nesting, aliases,
    ``.inf``), is a ValueError. Comma lists stay strings; list fields split them.
    """
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected KEY=VALUE, got {short_repr(pair)}")
        key = key.strip()
        try:
            parsed = load_yaml_text(value, key) if value.strip() else ""
        except YamlSyntaxError:
            parsed = value
        except YamlRefused as exc:
            path, reason = exc.problems[0]
            where = clip(key, 40) + ("" if not path or path.startswith("[") else ".") + clip(path, 60)
            raise ValueError(f"{where}: {reason}") from exc
        out[key] = parsed if isinstance(parsed, (str, int, float, bool, list)) or parsed is None else value
    return out


def format_validation_error(err: ValidationError, source: str = "", limit: int = MAX_PROBLEMS) -> str:
    """One line per problem, ``source: field: message (got value)``, at most ``limit`` of them."""
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(config)"
        msg = e["msg"].removeprefix("Value error, ")
        got = ""
        if "input" in e and not isinstance(e["input"], dict):
            shown = short_repr(e["input"])
            got = "" if shown in msg else f" (got {shown})"
        problems.append((where, f"{msg}{got}"))
    return problem_lines(source, problems, limit)
