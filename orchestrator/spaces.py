"""Search-space files: YAML -> validated ``SearchSpace`` -> trial configurations.

A search space is one YAML file::

    name: quickstart
    fixed:    {dataset: digits, model: cnn, epochs: 10}      # every trial
    grid:                                                   # every combination
      norm: [batchnorm, robustnorm]
      norm_power: {values: [0.1, 0.3], when: {norm: [robustnorm]}}   # conditional
    sample:                                                 # drawn per trial
      lr: {loguniform: [0.01, 0.1]}
      norm_power: {uniform: [0.1, 0.5], when: {norm: [robustnorm]}}
    search: {algorithm: random, num_samples: 4, metric: adv_acc, mode: max,
             scheduler: {type: asha, grace_period: 2}}              # or scheduler: fifo
    resources: {cpu: 1, gpu: 0.5}
    max_failures: 2
    checkpoint: {every: 1, keep: 2}

Every trial key must be a ``TrialConfig`` field and every value one it accepts; a key
with a ``when`` condition is only set for trials whose fixed or grid keys match it,
others keep the ``TrialConfig`` default. ``load_space`` reports every problem at once,
each with the file, the key path and what is allowed, before anything starts, including
what would only fail once the search runs: a name too long for a folder, a seed numpy
cannot take, ``true`` for a number, an ``init_from`` file that does not exist (a relative
one is made absolute: trials run in folders of their own), a study storage URL SQLAlchemy
cannot read or has no driver for here.

Files are read with the bounded reader of ``trainables.safe_yaml``; the grid is counted,
never built, before its size is checked (at most ``MAX_GRID_COMBINATIONS`` combinations
and ``MAX_TRIALS`` trials), so no file makes validation slow or large.
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
import re
from collections import Counter
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from trainables.config import (
    MAX_SEED,
    NumbersNotBooleans,
    TrialConfig,
    format_validation_error,
    is_integer_knob,
    parse_overrides,
)
from trainables.problems import MAX_PROBLEMS, Problem, problem_lines, short_repr
from trainables.safe_yaml import YamlRefused, load_yaml_file

PER_EPOCH_METRICS = ("adv_acc", "clean_acc", "train_acc", "train_loss")
MAX_VALIDATED_COMBINATIONS = 2000
MAX_GRID_COMBINATIONS = 10_000
MAX_TRIALS = 100_000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# A search's folder is NAME-YYYYmmdd-HHMMSS[-N] and a stage's folder is its name: far below a folder
# name's 255 bytes (and MLflow's 256-character experiment names, Optuna's 512-character study names).
MAX_NAME_LENGTH = 100
RESERVED_STAGE_NAMES = ("normlab", "report")  # folders normlab keeps in a search's folder
_Strict = ConfigDict(extra="forbid", allow_inf_nan=False)


class SpaceError(ValueError):
    """Every problem found in a search-space file, one ``file: path: message`` per line
    (at most ``MAX_PROBLEMS``, then ``... and N more``; ``problems`` keeps them all)."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source, self.problems = source, problems
        super().__init__(problem_lines(source, problems))


class GridKey(BaseModel):
    """A grid key: its values, and optionally the condition under which it applies."""

    model_config = _Strict
    values: list[Any] = Field(min_length=1)
    when: dict[str, list[Any]] = Field(default_factory=dict)


DISTRIBUTIONS = ("uniform", "loguniform", "int", "choice")


class SampleKey(NumbersNotBooleans):
    """A sampled key: exactly one distribution (``int`` bounds are inclusive), optionally conditional."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, allow_inf_nan=False)
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = Field(None, alias="int")
    choice: list[Any] | None = Field(None, min_length=1)
    when: dict[str, list[Any]] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_distribution(self) -> SampleKey:
        given = [k for k in DISTRIBUTIONS if self.arguments(k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)} (got {', '.join(given) or 'none'})")
        bounds = self.arguments(given[0])
        if given[0] != "choice" and not bounds[0] < bounds[1]:
            raise ValueError(f"{given[0]}: low must be below high, got {list(bounds)}")
        if given[0] == "loguniform" and bounds[0] <= 0:
            raise ValueError(f"loguniform: bounds must be > 0, got {list(bounds)}")
        return self

    def arguments(self, kind: str) -> Any:
        return getattr(self, "randint" if kind == "int" else kind)

    @property
    def kind(self) -> str:
        return next(k for k in DISTRIBUTIONS if self.arguments(k) is not None)

    def probe_values(self) -> list[Any]:
        """Values that must all be valid for the key: both bounds, or every choice."""
        return list(self.arguments(self.kind))


class Scheduler(NumbersNotBooleans):
    """ASHA or FIFO; ``scheduler: fifo`` is short for ``scheduler: {type: fifo}``."""

    model_config = _Strict
    type: Literal["fifo", "asha"] = "fifo"
    max_t: int | None = Field(None, gt=0, description="ASHA: most epochs a trial runs (default: epochs)")
    grace_period: int = Field(1, gt=0, description="ASHA: epochs before a trial can be stopped")
    reduction_factor: float = Field(3.0, gt=1.0, description="ASHA: keep 1/reduction_factor at each rung")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"type": data}
        if not isinstance(data, (dict, Scheduler)):
            raise ValueError(f"fifo or asha, or a mapping such as {{type: asha, grace_period: 2}} "
                             f"(got {short_repr(data)})")
        return data


SAMPLERS = ("tpe", "cmaes", "nsgaii", "qmc", "random")
Mode = Literal["max", "min"]


class Search(NumbersNotBooleans):
    model_config = _Strict
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = Field(1, gt=0, description="grid/random: repeats of the grid; optuna: number of trials")
    metric: str | list[str] = Field("adv_acc", description="the objective, or several (optuna: a Pareto front)")
    mode: Mode | list[Mode] = Field("max", description="max or min, one per metric (one value applies to all)")
    sampler: Literal["tpe", "cmaes", "nsgaii", "qmc", "random"] | None = Field(
        None, description="optuna: the sampler (default tpe; nsgaii with several metrics)")
    storage: str | None = Field(None, description="optuna: SQLAlchemy URL of the study (default: sqlite beside the MLflow store)")
    scheduler: Scheduler = Field(default_factory=Scheduler)
    max_concurrent_trials: int | None = Field(None, gt=0)
    sampler_seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the random / Optuna sampler (numpy's range)")

    @field_validator("mode", mode="before")
    @classmethod
    def _mode(cls, v: Any) -> Any:
        if not all(m in ("max", "min") for m in (v if isinstance(v, list) else [v])):
            raise ValueError(f"allowed: 'max' or 'min', or a list of them, one per metric (got {short_repr(v)})")
        return v

    @field_validator("storage")
    @classmethod
    def _storage(cls, v: str | None) -> str | None:
        if v is None:
            return v
        from orchestrator.retry import strip_credentials

        if strip_credentials(v)[2]:
            raise ValueError("the study storage URL carries a password: Ray pickles the study (and its URL) into "
                             "the search's state; use the database's own credentials (e.g. ~/.pgpass) instead")
        return check_storage_url(v)

    @field_validator("metric", mode="before")
    @classmethod
    def _metric_type(cls, v: Any) -> Any:
        if not (isinstance(v, str) or (isinstance(v, list) and all(isinstance(m, str) for m in v))):
            raise ValueError(f"a metric name, or a list of them (got {short_repr(v)})")
        return v

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str | list[str]) -> str | list[str]:
        for name in [v] if isinstance(v, str) else v:
            if name not in PER_EPOCH_METRICS:
                raise ValueError(
                    f"unknown metric {short_repr(name)}; the search metric must be reported every epoch (for schedulers "
                    f"and Optuna): one of {', '.join(PER_EPOCH_METRICS)}. adv_acc is the first of eval_attacks at the "
                    "first of eval_eps; final_* metrics are measured once, after the last epoch"
                )
        if isinstance(v, list) and (not v or len(set(v)) != len(v)):
            raise ValueError("give one metric, or a list of different metrics")
        return v[0] if isinstance(v, list) and len(v) == 1 else v

    @model_validator(mode="after")
    def _objectives(self) -> Search:
        metrics = self.metrics
        modes = [self.mode] * len(metrics) if isinstance(self.mode, str) else list(self.mode)
        if len(modes) != len(metrics):
            raise ValueError(f"mode lists {len(modes)} value(s) for {len(metrics)} metric(s): give one per metric")
        if self.algorithm != "optuna" and (self.sampler or self.storage):
            raise ValueError("sampler and storage are Optuna settings: they need algorithm optuna")
        if len(metrics) > 1:
            if self.algorithm != "optuna":
                raise ValueError("several metrics need algorithm optuna (a Pareto front; NSGA-II by default): "
                                 "grid and random searches rank trials on one metric")
            if self.scheduler.type == "asha":
                raise ValueError("ASHA cannot stop trials on several metrics: it ranks trials on one metric at each "
                                 "rung, and with several objectives no single ranking exists; use scheduler: fifo")
            if self.sampler == "cmaes":
                raise ValueError("CMA-ES optimises a single objective: with several metrics use nsgaii, tpe, qmc or random")
        if isinstance(self.mode, list) and len(self.mode) == 1:  # as the metric: one objective is a plain value
            self.mode = self.mode[0]
        return self

    @property
    def metrics(self) -> list[str]:
        return [self.metric] if isinstance(self.metric, str) else list(self.metric)

    @property
    def modes(self) -> list[str]:
        return [self.mode] * len(self.metrics) if isinstance(self.mode, str) else list(self.mode)

    @property
    def multi_objective(self) -> bool:
        return len(self.metrics) > 1

    @property
    def sampler_name(self) -> str:
        return self.sampler or ("nsgaii" if self.multi_objective else "tpe")

    def describe(self) -> str:
        """``metric (mode)`` or ``[m1 (max), m2 (max)]``, for messages."""
        pairs = [f"{m} ({d})" for m, d in zip(self.metrics, self.modes)]
        return pairs[0] if len(pairs) == 1 else "[" + ", ".join(pairs) + "]"


def check_storage_url(url: str) -> str:
    """``url`` if SQLAlchemy can read it as a database URL, its driver imports here (Optuna's
    storage is opened by the driver process) and a SQLite file's folder exists; a ValueError
    otherwise. The URL is never quoted back (it may hold secrets in its query)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    example = "e.g. sqlite:////abs/path/optuna.db"
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError) as exc:
        raise ValueError("SQLAlchemy cannot read this as a database URL "
                         f"(dialect[+driver]://[user@]host[:port]/database, {example})") from exc
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError as exc:
        raise ValueError(f"SQLAlchemy knows no database kind {short_repr(parsed.drivername)} ({example})") from exc
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        raise ValueError(f"the driver of {short_repr(parsed.drivername)} is not installed here (no module "
                         f"{short_repr(missing)}): install it, or name a driver that is installed") from exc
    database = parsed.database or ""
    on_disk = database and database != ":memory:" and not database.startswith("file:")
    if parsed.get_backend_name() == "sqlite" and on_disk:
        if not Path(database).parent.is_dir():
            raise ValueError(f"the folder {short_repr(str(Path(database).parent))} of the SQLite file does not exist")
    return url


class Resources(NumbersNotBooleans):
    model_config = _Strict
    cpu: float = Field(1.0, gt=0, description="CPUs per trial (sets torch threads)")
    gpu: float = Field(0.0, ge=0, le=1, description="GPUs per trial, at most 1 (a trial uses one device); 0.5: two trials share a GPU")


class CheckpointPolicy(NumbersNotBooleans):
    model_config = _Strict
    every: int = Field(1, gt=0, description="checkpoint every N epochs (and always after the last)")
    keep: int = Field(2, gt=0, description="checkpoints kept per trial")


def _grid_shorthand(v: Any) -> Any:
    """``norm: [a, b]`` in a grid means ``norm: {values: [a, b]}``."""
    if isinstance(v, dict):
        return {k: {"values": x} if isinstance(x, list) else x for k, x in v.items()}
    return v


class InitFrom(BaseModel):
    """``init_from: {stage: pretrain}``, or ``init_from: pretrain`` for short."""

    model_config = _Strict
    stage: str = Field(description="an earlier stage: each trial starts from the final checkpoint of its match there")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"stage": data}
        if not isinstance(data, (dict, InitFrom)):
            raise ValueError(f"an earlier stage's name, or {{stage: NAME}} (got {short_repr(data)})")
        return data


class Stage(BaseModel):
    """One stage of a multi-stage search: its own trial keys, maybe starting from an earlier stage."""

    model_config = _Strict
    description: str = ""
    fixed: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, GridKey] = Field(default_factory=dict)
    sample: dict[str, SampleKey] = Field(default_factory=dict)
    init_from: InitFrom | None = None

    @field_validator("grid", mode="before")
    @classmethod
    def _grid_lists(cls, v: Any) -> Any:
        return _grid_shorthand(v)


class SearchSpace(NumbersNotBooleans):
    """A validated search-space file."""

    model_config = _Strict
    name: str
    description: str = ""
    fixed: dict[str, Any] = Field(default_factory=dict)
    grid: dict[str, GridKey] = Field(default_factory=dict)
    sample: dict[str, SampleKey] = Field(default_factory=dict)
    seeds: list[int] | None = Field(None, description="shorthand for a grid over seed (in every stage)")
    stages: dict[str, Stage] = Field(default_factory=dict, description="stages run in order as one search")
    search: Search = Field(default_factory=Search)
    resources: Resources = Field(default_factory=Resources)
    max_failures: int = Field(2, ge=-1, description="retries of a failed trial from its last checkpoint (-1: forever)")
    checkpoint: CheckpointPolicy = Field(default_factory=CheckpointPolicy)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"name {short_repr(v)} must be letters, digits, '_', '.', '-' (it names folders and MLflow experiments)")
        if len(v) > MAX_NAME_LENGTH:
            raise ValueError(f"name is {len(v)} characters long; at most {MAX_NAME_LENGTH} (it names the search's "
                             "folder NAME-YYYYmmdd-HHMMSS and its MLflow experiment)")
        return v

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, v: dict[str, Stage]) -> dict[str, Stage]:
        for name in v:
            if not _NAME.match(name) or name in RESERVED_STAGE_NAMES:
                raise ValueError(f"stage name {short_repr(name)} must be letters, digits, '_', '.', '-' and not "
                                 f"{' or '.join(RESERVED_STAGE_NAMES)} (it names the stage's folder beside normlab's own)")
            if len(name) > MAX_NAME_LENGTH:
                raise ValueError(f"stage name {short_repr(name)} is {len(name)} characters long; at most "
                                 f"{MAX_NAME_LENGTH} (it names the stage's folder and its Optuna study)")
        return v

    @field_validator("seeds")
    @classmethod
    def _seed_list(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v) or min(v) < 0 or max(v) > MAX_SEED):
            raise ValueError(f"a list of different seeds from 0 to {MAX_SEED} (2**32 - 1, the most numpy's generator "
                             "takes), e.g. [0, 1, 2]")
        return v

    @field_validator("grid", mode="before")
    @classmethod
    def _grid_lists(cls, v: Any) -> Any:
        return _grid_shorthand(v)

    @model_validator(mode="after")
    def _seeds_and_stages(self) -> SearchSpace:
        if self.stages and (self.grid or self.sample):
            raise ValueError("with stages, grid and sample keys belong to the stages (fixed keys may stay at the top)")
        if self.seeds is not None:
            if self.search.algorithm == "optuna":
                raise ValueError("seeds repeats each grid trial once per seed; Optuna would treat seed as one more "
                                 "parameter to tune (and rank its importance): fix seed in fixed, or use algorithm grid")
            for where in self.stages.values() if self.stages else [self]:
                if "seed" in where.grid or "seed" in where.sample or "seed" in where.fixed or "seed" in self.fixed:
                    raise ValueError("seeds is a grid over seed: do not set seed elsewhere as well")
                where.grid = {**where.grid, "seed": GridKey(values=list(self.seeds))}
            self.seeds = None  # now in the grid(s): a dump of this space reloads to the same space
        return self

    # --- derived ---------------------------------------------------------------------
    def conditional_keys(self) -> set[str]:
        return {k for k, g in self.grid.items() if g.when} | {k for k, s in self.sample.items() if s.when}

    def iter_grid_combinations(self) -> Iterator[dict[str, Any]]:
        """Every combination of grid values, in order; conditional keys only where their condition holds.

        The first key varies slowest; a key whose condition fails is left out of the combination.
        """
        items = list(self.grid.items())
        stack: list[tuple[int, dict[str, Any]]] = [(0, {})]
        while stack:
            index, combo = stack.pop()
            if index == len(items):
                yield combo
                continue
            key, spec = items[index]
            if matches(spec.when, {**self.fixed, **combo}):
                stack.extend((index + 1, {**combo, key: value}) for value in reversed(spec.values))
            else:
                stack.append((index + 1, combo))

    def grid_combinations(self) -> list[dict[str, Any]]:
        """``iter_grid_combinations`` as a list (check ``combination_count`` first: it can be huge)."""
        return list(self.iter_grid_combinations())

    def combination_count(self, limit: int = MAX_GRID_COMBINATIONS) -> int | None:
        """``len(self.grid_combinations())`` without building them; None if clearly over ``limit``."""
        return count_grid_combinations(self.grid, self.fixed, limit)

    def trial_count(self) -> int:
        """Trials the search will run: grid combinations x num_samples, or Optuna's budget (summed over stages)."""
        if self.stages:
            from orchestrator.stages import stage_views

            return sum(view.space.trial_count() for view in stage_views(self))
        if self.search.algorithm == "optuna":
            return self.search.num_samples
        count = self.combination_count()
        if count is None:
            raise ValueError(f"more than {MAX_GRID_COMBINATIONS:,} grid combinations")
        return self.search.num_samples * count

    def trial_keys(self) -> list[str]:
        """Keys that vary between trials, in file order (for tables)."""
        return [*self.grid, *self.sample]


def default_of(key: str) -> Any:
    """TrialConfig's default of ``key`` as a condition sees it (None for unknown keys)."""
    field = TrialConfig.model_fields.get(key)
    return field.default if field is not None else None


def matches(when: dict[str, list[Any]], values: dict[str, Any]) -> bool:
    """Whether every ``when`` key has one of its listed values in ``values`` (defaults otherwise)."""
    return all(values.get(k, default_of(k)) in allowed for k, allowed in when.items())


def count_grid_combinations(grid: dict[str, GridKey], fixed: dict[str, Any], limit: int) -> int | None:
    """How many combinations ``SearchSpace.grid_combinations`` makes, without making them.

    A ``when`` condition sees an earlier grid key's value where that key was chosen, else
    the fixed value or TrialConfig's default. So the count is a dynamic program over
    states that record, for each key some condition tests, which of those tests its
    current value passes; unconditional keys just multiply. Every state stands for at
    least one combination, so there are never more states than combinations: None as
    soon as there are more than ``limit`` states (and so more than ``limit`` combinations).
    """
    tests: dict[str, list[list[Any]]] = {}  # tested key -> the allowed lists of its tests
    checks: dict[str, list[tuple[str, int]]] = {}  # grid key -> its tests, as (tested key, test)
    for name, spec in grid.items():
        for key, allowed in spec.when.items():
            tests.setdefault(key, []).append(allowed)
            checks.setdefault(name, []).append((key, len(tests[key]) - 1))
    slots = {key: i for i, key in enumerate(tests)}

    def passes(key: str, value: Any) -> tuple[bool, ...]:
        return tuple(value in allowed for allowed in tests[key])

    states: Counter[tuple[tuple[bool, ...], ...]] = Counter({tuple(passes(k, fixed.get(k, default_of(k))) for k in tests): 1})
    for name, spec in grid.items():
        slot = slots.get(name)
        kinds = Counter(passes(name, value) for value in spec.values) if slot is not None else None
        following: Counter[tuple[tuple[bool, ...], ...]] = Counter()
        for state, n in states.items():
            if not all(state[slots[key]][test] for key, test in checks.get(name, ())):
                following[state] += n
            elif kinds is None:
                following[state] += n * len(spec.values)
            else:
                for kind, m in kinds.items():
                    following[(*state[:slot], kind, *state[slot + 1:])] += n * m
            if len(following) > limit:
                return None
        states = following
    return sum(states.values())


# --------------------------------------------------------------------- validation


def _field_problems(values: dict[str, Any], keys: list[str]) -> dict[str, str]:
    """Problems TrialConfig finds with ``keys`` of ``values`` (other fields' problems ignored)."""
    try:
        TrialConfig.model_validate(values)
    except ValidationError as err:
        out: dict[str, str] = {}
        for e in err.errors():
            if e["loc"] and e["loc"][0] in keys:
                line = format_validation_error(ValidationError.from_exception_data(err.title, [e]))
                out.setdefault(str(e["loc"][0]), line.split(": ", 1)[1] if ": " in line else line)
        return out
    return {}


def _unknown_key(key: str, hint: bool = True) -> str:
    """An unknown knob, with the closest names (``hint``: they cost a string comparison per knob)."""
    close = difflib.get_close_matches(key, list(TrialConfig.model_fields), n=3) if hint else []
    hint_text = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{short_repr(key)} is not a trial knob{hint_text} (`normlab trial --help` lists them all)"


def _grid_size(count: int | None) -> str:
    if count is None:
        return f"more than {MAX_GRID_COMBINATIONS:,}"
    return f"{count:,}" if count < 10**15 else f"about 10^{int(math.log10(count))}"


def size_problems(space: SearchSpace) -> list[Problem]:
    """A grid over ``MAX_GRID_COMBINATIONS`` combinations or a search over ``MAX_TRIALS`` trials."""
    if space.search.algorithm == "optuna":
        if space.search.num_samples > MAX_TRIALS:
            return [("search.num_samples", f"{space.search.num_samples:,} trials; at most {MAX_TRIALS:,}")]
        return []
    count = space.combination_count()
    if count is None or count > MAX_GRID_COMBINATIONS:
        reason = (f"{_grid_size(count)} combinations of grid values; at most {MAX_GRID_COMBINATIONS:,} "
                  "(list fewer values, add when: conditions, or sample keys with algorithm random or optuna)")
        return [("grid", reason)]
    trials = count * space.search.num_samples
    if trials > MAX_TRIALS:
        reason = f"{trials:,} trials ({count:,} grid combinations x {space.search.num_samples:,} samples); at most {MAX_TRIALS:,}"
        return [("search.num_samples", reason)]
    return []


def semantic_problems(space: SearchSpace) -> list[Problem]:
    """Problems beyond the file's structure: unknown knobs, sizes, bad values, impossible combinations."""
    problems: list[Problem] = []
    known = set(TrialConfig.model_fields)
    sections = {"fixed": list(space.fixed), "grid": list(space.grid), "sample": list(space.sample)}
    seen: dict[str, str] = {}
    for section, keys in sections.items():
        for key in keys:
            if key not in known:
                problems.append((f"{section}.{key}", _unknown_key(key, hint=len(problems) < MAX_PROBLEMS)))
            elif key in seen:
                problems.append((f"{section}.{key}", f"also set in {seen[key]}: a key belongs to one section"))
            seen.setdefault(key, section)
    if all(key in known for key in space.grid):  # at most one grid key per knob: counting is quick
        too_big = size_problems(space)
        if too_big:
            return too_big + problems
    fixed = {k: v for k, v in space.fixed.items() if k in known}
    grid = {k: v for k, v in space.grid.items() if k in known}
    sample = {k: v for k, v in space.sample.items() if k in known}

    fixed_problems = _field_problems(fixed, list(fixed))
    problems += [(f"fixed.{k}", msg) for k, msg in fixed_problems.items()]
    base = {k: v for k, v in fixed.items() if k not in fixed_problems}

    def check_value(path: str, key: str, value: Any) -> None:
        found = _field_problems({**base, key: value}, [key])
        if key in found:
            problems.append((path, found[key]))

    for key, spec in grid.items():
        for i, value in enumerate(spec.values):
            check_value(f"grid.{key}[{i}]", key, value)
    for key, spec in sample.items():
        if spec.kind in ("uniform", "loguniform") and is_integer_knob(key):
            problems.append((f"sample.{key}.{spec.kind}", f"draws fractional numbers, but {key} is a whole number: use int: [low, high]"))
            continue
        for i, value in enumerate(spec.probe_values()):
            check_value(f"sample.{key}.{spec.kind}[{i}]", key, value)
    for section, specs in (("grid", grid), ("sample", sample)):
        for key, spec in specs.items():
            for cond_key, allowed in spec.when.items():
                path = f"{section}.{key}.when.{cond_key}"
                if cond_key not in known:
                    problems.append((path, _unknown_key(cond_key, hint=len(problems) < MAX_PROBLEMS)))
                elif cond_key in space.sample:
                    problems.append((path, "a condition can only test fixed or grid keys, not sampled ones"))
                elif cond_key == key:
                    problems.append((path, "a key cannot depend on itself"))
                else:
                    for i, value in enumerate(allowed):
                        check_value(f"{path}[{i}]", cond_key, value)
    if space.search.algorithm == "grid" and space.sample:
        problems.append(("search.algorithm", "sampled keys need algorithm 'random' or 'optuna' (grid enumerates only grid keys)"))
    if problems:
        return problems
    return _combination_problems(space, base)


def _trial_key_holders(space: SearchSpace) -> Iterator[tuple[str, Stage | SearchSpace]]:
    """The top level and each stage, with the prefix of their key paths."""
    yield "", space
    for name, stage in space.stages.items():
        yield f"stages.{name}.", stage


def init_from_problems(space: SearchSpace) -> list[Problem]:
    """Every ``init_from`` checkpoint a file names (in fixed, grid or sample choices, of the search
    and its stages) must be an existing file: refused here rather than when its trials start. A
    relative path is made absolute (trials run in folders of their own); URIs (``s3://``) are
    read where the trials run and are not checked. A stage's ``init_from: STAGE`` is a later
    checkpoint, not a file: ``stages`` checks it."""
    problems: list[Problem] = []
    stages = set(space.stages)

    def check(path: str, value: Any) -> Any:
        if not isinstance(value, str) or "://" in value or value.lower() in ("", "none", "null", "~"):
            return value  # TrialConfig reports a non-string; None means no checkpoint
        try:
            file = Path(value).expanduser()
            exists, is_file = file.exists(), file.is_file()
            absolute = os.path.abspath(file)
        except (OSError, ValueError, RuntimeError) as exc:  # NUL byte, name too long, unknown ~user
            problems.append((path, f"not a usable path ({exc})"))
            return value
        if not is_file:
            reason = (f"{short_repr(value)} is a folder, not a checkpoint file" if exists else
                      f"no such file {short_repr(value)}; init_from names the checkpoint file a trial starts from")
            if value in stages:
                reason += f" (to start from stage {value}'s trials, give that stage init_from: {value})"
            problems.append((path, reason))
            return value
        return absolute if absolute != value else value

    for prefix, holder in _trial_key_holders(space):
        if "init_from" in holder.fixed:
            holder.fixed["init_from"] = check(f"{prefix}fixed.init_from", holder.fixed["init_from"])
        if "init_from" in holder.grid:
            values = holder.grid["init_from"].values
            values[:] = [check(f"{prefix}grid.init_from[{i}]", v) for i, v in enumerate(values)]
        sample = holder.sample.get("init_from")
        if sample is not None and sample.choice is not None:
            sample.choice[:] = [check(f"{prefix}sample.init_from.choice[{i}]", v) for i, v in enumerate(sample.choice)]
    return problems


def _combination_problems(space: SearchSpace, base: dict[str, Any]) -> list[Problem]:
    """Whole trial configurations, so cross-field rules (e.g. regime needs init_from) are checked."""
    problems: list[Problem] = []
    combos = itertools.islice(space.iter_grid_combinations(), MAX_VALIDATED_COMBINATIONS)
    probe = {k: s.probe_values()[0] for k, s in space.sample.items() if not s.when}
    for i, combo in enumerate(combos):
        values = {**base, **probe, **combo}
        try:
            cfg = TrialConfig.model_validate(values)
        except ValidationError as err:
            label = ", ".join(f"{k}={v if isinstance(v, str) else short_repr(v)}" for k, v in combo.items()) or "fixed keys"
            detail = format_validation_error(err).replace("(config): ", "").replace("\n", "; ")
            problems.append((f"grid combination {i + 1} ({label})", detail))
            if len(problems) >= 5:
                problems.append(("", f"(further combinations not listed; {space.combination_count()} in all)"))
                break
            continue
        if space.search.scheduler.type == "asha" and (space.search.scheduler.max_t or cfg.epochs) < space.search.scheduler.grace_period:
            problems.append(("search.scheduler.grace_period", f"larger than max_t / epochs ({cfg.epochs})"))
            break
    return problems


# -------------------------------------------------------------------- loading

SEARCH_OVERRIDES = {
    "num_samples": ("search", "num_samples"),
    "algorithm": ("search", "algorithm"),
    "metric": ("search", "metric"),
    "mode": ("search", "mode"),
    "scheduler": ("search", "scheduler", "type"),
    "max_concurrent_trials": ("search", "max_concurrent_trials"),
    "sampler_seed": ("search", "sampler_seed"),
    "cpu": ("resources", "cpu"),
    "gpu": ("resources", "gpu"),
    "max_failures": ("max_failures",),
    "checkpoint_every": ("checkpoint", "every"),
    "checkpoint_keep": ("checkpoint", "keep"),
    "name": ("name",),
}


SHORTHANDS = {"scheduler": "type"}  # a mapping given as one word: scheduler: fifo is {type: fifo}


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Command-line ``KEY=VALUE``: search settings by their short name, or a trial key fixed for every trial.

    A section of the file that is not a mapping is left as it is, for validation to report.
    """
    raw = dict(raw)
    if isinstance(raw.get("stages"), dict):
        raw["stages"] = {k: dict(v) if isinstance(v, dict) else v for k, v in raw["stages"].items()}
    for key, value in overrides.items():
        *parents, leaf = SEARCH_OVERRIDES.get(key, ("fixed", key))
        if key not in SEARCH_OVERRIDES:
            stages = raw.get("stages") if isinstance(raw.get("stages"), dict) else {}
            holders = [raw, *(st for st in stages.values() if isinstance(st, dict))]
            for holder in holders:  # a trial knob on the command line holds for every trial, every stage
                for section in ("grid", "sample", "fixed") if holder is not raw else ("grid", "sample"):
                    if isinstance(holder.get(section), dict) and key in holder[section]:
                        holder[section] = {k: v for k, v in holder[section].items() if k != key}
            if key == "seed":
                raw.pop("seeds", None)
        node = raw
        for p in parents:
            child = node.get(p) or {}
            if p in SHORTHANDS and isinstance(child, str):  # scheduler: fifo, then scheduler=asha
                child = {SHORTHANDS[p]: child}
            if not isinstance(child, dict):
                break
            node[p] = dict(child)
            node = node[p]
        else:
            node[leaf] = value
    return raw


def choose_data(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """``data_options:``, a list of alternative fixed keys (e.g. a dataset on disk, then digits):
    the first whose ``if_exists`` path exists is merged into ``fixed`` (it wins over the file's
    own fixed keys; command-line overrides win over it). Relative paths (``if_exists`` and a
    ``data_dir``) are looked up in the working directory, then beside the folder that holds the
    file's package or folder (a checkout), and stored absolute, so trials on any node read the
    same folder."""
    options = raw.get("data_options")
    if options is None:
        return raw
    if not isinstance(options, list) or not all(isinstance(o, dict) for o in options) or not options:
        raise ValueError("a list of mappings of fixed keys, each with an optional if_exists: PATH")
    bases = [Path.cwd(), path.resolve().parent.parent]

    def find(value: str) -> Path | None:
        candidate = Path(value).expanduser()
        for base in [Path("/")] if candidate.is_absolute() else bases:
            if (base / candidate).exists():
                return (base / candidate).resolve()
        return None

    for option in options:
        condition = option.get("if_exists")
        if condition is not None and find(str(condition)) is None:
            continue
        chosen = {k: v for k, v in option.items() if k != "if_exists"}
        if isinstance(chosen.get("data_dir"), str):
            found = find(chosen["data_dir"])
            chosen["data_dir"] = str(found) if found else chosen["data_dir"]
        raw = {k: v for k, v in raw.items() if k != "data_options"}
        raw["fixed"] = {**(raw.get("fixed") or {}), **chosen} if isinstance(raw.get("fixed") or {}, dict) else raw.get("fixed")
        return raw
    raise ValueError("no option applies: every if_exists path is missing; add a last option without if_exists")


def builtin_spaces() -> dict[str, Path]:
    """Search spaces shipped in the ``search_spaces`` package, by name."""
    folder = resources.files("search_spaces")
    return {Path(str(f)).stem: Path(str(f)) for f in folder.iterdir() if str(f).endswith((".yaml", ".yml"))}


def resolve_space_path(name_or_path: str) -> Path:
    """A built-in space name (``quickstart``) or a path to a YAML file."""
    try:
        path = Path(name_or_path).expanduser()
        if path.suffix in (".yaml", ".yml") or path.exists():
            if not path.is_file():
                raise SpaceError(str(path), [("", "not a file" if path.exists() else "no such file")])
            return path
    except (OSError, ValueError, RuntimeError) as exc:  # name too long, NUL byte, unknown ~user
        if isinstance(exc, SpaceError):
            raise
        raise SpaceError(name_or_path, [("", f"not a usable path: {exc}")]) from exc
    builtin = builtin_spaces()
    if name_or_path in builtin:
        return builtin[name_or_path]
    raise SpaceError(name_or_path, [("", f"neither a file nor a built-in search space; built-in: {', '.join(sorted(builtin))}")])


def load_space(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[SearchSpace, Path]:
    """Read, override and validate a search space; raise ``SpaceError`` listing every problem."""
    path = resolve_space_path(name_or_path)
    source = str(path)
    try:
        raw = load_yaml_file(path)
    except YamlRefused as exc:
        raise SpaceError(source, exc.problems) from exc
    if not isinstance(raw, dict):
        raise SpaceError(source, [("", f"expected a mapping at the top level, got {type(raw).__name__}")])
    try:
        raw = choose_data(raw, path)
    except ValueError as exc:
        raise SpaceError(source, [("data_options", str(exc))]) from exc
    try:
        raw = apply_overrides(raw, parse_overrides(list(overrides)))
    except ValueError as exc:
        raise SpaceError("command line", [("", str(exc))]) from exc
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            path_s = ".".join(str(p)[:40] for p in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key (allowed here: " + ", ".join(_allowed_at(e["loc"])) + ")"
            elif e["type"] == "literal_error":
                msg = msg.replace("Input should be", "allowed:")
            elif e["type"] in ("model_type", "model_attributes_type"):
                msg = "expected a mapping (keys: " + ", ".join(_allowed_at((*e["loc"], ""))) + ")"
            problems.append((path_s, msg))
        raise SpaceError(source, problems) from err
    problems = init_from_problems(space)
    if space.stages:
        from orchestrator.stages import stage_problems

        problems += stage_problems(space)
    else:
        problems += semantic_problems(space)
    if problems:
        raise SpaceError(source, problems)
    return space, path


def _allowed_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names allowed at the parent of ``loc`` (for 'unknown key' messages)."""
    model: type[BaseModel] = SearchSpace
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            if model is SearchSpace:
                break
            continue
        annotation = field.annotation
        inner = getattr(annotation, "__args__", ())
        candidates = [a for a in (annotation, *inner) if isinstance(a, type) and issubclass(a, BaseModel)]
        if candidates:
            model = candidates[0]
    return [field.alias or name for name, field in model.model_fields.items()]
