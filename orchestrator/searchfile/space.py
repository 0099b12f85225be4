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

A file may also name ``profiles:``, partial files that ``--profile NAME`` merges over it
(``profiles``); the space records which in ``profile``.

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

import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from orchestrator.searchfile.sampler_options import sampler_option_problems
from trainables.config import (
    MAX_SEED,
    NumbersNotBooleans,
    TrialConfig,
)
from trainables.metrics import EPOCH_METRICS
from trainables.problems import Problem, problem_lines, short_repr

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
            raise ValueError(
                f"fifo or asha, or a mapping such as {{type: asha, grace_period: 2}} (got {short_repr(data)})"
            )
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
        None, description="optuna: the sampler (default tpe; nsgaii with several metrics)"
    )
    storage: str | None = Field(
        None, description="optuna: SQLAlchemy URL of the study (default: sqlite beside the MLflow store)"
    )
    sampler_options: dict[str, Any] = Field(
        default_factory=dict,
        description="optuna: the sampler's own options, e.g. {n_startup_trials: 5} for tpe "
        "(orchestrator/searchfile/sampler_options.py lists each sampler's)",
    )
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
        from orchestrator.credentials.uris import url_password

        if where := url_password(v):
            raise ValueError(
                f"the study storage URL carries a password ({where}): normlab records the URL with the "
                "search (its record, MLflow tags, Ray's pickled state), so it must hold none. Write it "
                "without the password (postgresql://USER@HOST:PORT/DATABASE) and give the password to the "
                "database driver through its own environment: PGPASSWORD, or a password file (PGPASSFILE, "
                "~/.pgpass) for PostgreSQL"
            )
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
            if name not in EPOCH_METRICS:
                raise ValueError(
                    f"unknown metric {short_repr(name)}; the search metric must be reported every epoch (for schedulers "
                    f"and Optuna): one of {', '.join(EPOCH_METRICS)}. adv_acc is the first of eval_attacks at the "
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
        if self.algorithm != "optuna" and (self.sampler or self.storage or self.sampler_options):
            raise ValueError("sampler, sampler_options and storage are Optuna settings: they need algorithm optuna")
        if len(metrics) > 1:
            if self.algorithm != "optuna":
                raise ValueError(
                    "several metrics need algorithm optuna (a Pareto front; NSGA-II by default): "
                    "grid and random searches rank trials on one metric"
                )
            if self.scheduler.type == "asha":
                raise ValueError(
                    "ASHA cannot stop trials on several metrics: it ranks trials on one metric at each "
                    "rung, and with several objectives no single ranking exists; use scheduler: fifo"
                )
            if self.sampler == "cmaes":
                raise ValueError(
                    "CMA-ES optimises a single objective: with several metrics use nsgaii, tpe, qmc or random"
                )
        if problems := sampler_option_problems(self.sampler_name, self.sampler_options):
            raise ValueError("sampler_options: " + "; ".join(problems))
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


_POSTGRES = "postgresql://"


def _imports(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def sqlalchemy_url(url: str) -> str:
    """The URL SQLAlchemy opens for a study storage ``url``: the same, except that a plain
    ``postgresql://`` names psycopg2 when psycopg 3 (SQLAlchemy 2.1's default PostgreSQL driver)
    is not installed and psycopg2 is (normlab's ``cluster`` extra installs psycopg2-binary).
    The search keeps ``url`` as written; the validator checks and the study opens this one."""
    if url.startswith(_POSTGRES) and not _imports("psycopg") and _imports("psycopg2"):
        return "postgresql+psycopg2://" + url.removeprefix(_POSTGRES)
    return url


def check_storage_url(url: str) -> str:
    """``url`` if SQLAlchemy can read it as a database URL, its driver imports here (Optuna's
    storage is opened by the driver process) and a SQLite file's folder exists; a ValueError
    otherwise. The URL is never quoted back (it may hold secrets in its query)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    example = "e.g. sqlite:////abs/path/optuna.db"
    try:
        parsed = make_url(sqlalchemy_url(url))
    except (ArgumentError, ValueError) as exc:
        raise ValueError(
            f"SQLAlchemy cannot read this as a database URL (dialect[+driver]://[user@]host[:port]/database, {example})"
        ) from exc
    try:
        dialect = parsed.get_dialect()
    except NoSuchModuleError as exc:
        raise ValueError(f"SQLAlchemy knows no database kind {short_repr(parsed.drivername)} ({example})") from exc
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        raise ValueError(
            f"the driver of {short_repr(parsed.drivername)} is not installed here (no module "
            f"{short_repr(missing)}): install it, or name a driver that is installed"
        ) from exc
    database = parsed.database or ""
    on_disk = database and database != ":memory:" and not database.startswith("file:")
    if parsed.get_backend_name() == "sqlite" and on_disk:
        if not Path(database).parent.is_dir():
            raise ValueError(f"the folder {short_repr(str(Path(database).parent))} of the SQLite file does not exist")
    return url


class Resources(NumbersNotBooleans):
    model_config = _Strict
    cpu: float = Field(1.0, gt=0, description="CPUs per trial (sets torch threads)")
    gpu: float = Field(
        0.0, ge=0, le=1, description="GPUs per trial, at most 1 (a trial uses one device); 0.5: two trials share a GPU"
    )


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
    profile: str | None = Field(
        None,
        exclude_if=lambda v: v is None,  # a space resolved without a profile dumps as before
        description="the profile of the file this space was resolved with (--profile; set by load_space, "
        "never in a file): the search's record keeps it, and its MLflow run (tag normlab.profile)",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(
                f"name {short_repr(v)} must be letters, digits, '_', '.', '-' (it names folders and MLflow experiments)"
            )
        if len(v) > MAX_NAME_LENGTH:
            raise ValueError(
                f"name is {len(v)} characters long; at most {MAX_NAME_LENGTH} (it names the search's "
                "folder NAME-YYYYmmdd-HHMMSS and its MLflow experiment)"
            )
        return v

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, v: dict[str, Stage]) -> dict[str, Stage]:
        for name in v:
            if not _NAME.match(name) or name in RESERVED_STAGE_NAMES:
                raise ValueError(
                    f"stage name {short_repr(name)} must be letters, digits, '_', '.', '-' and not "
                    f"{' or '.join(RESERVED_STAGE_NAMES)} (it names the stage's folder beside normlab's own)"
                )
            if len(name) > MAX_NAME_LENGTH:
                raise ValueError(
                    f"stage name {short_repr(name)} is {len(name)} characters long; at most "
                    f"{MAX_NAME_LENGTH} (it names the stage's folder and its Optuna study)"
                )
        return v

    @field_validator("seeds")
    @classmethod
    def _seed_list(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v) or min(v) < 0 or max(v) > MAX_SEED):
            raise ValueError(
                f"a list of different seeds from 0 to {MAX_SEED} (2**32 - 1, the most numpy's generator "
                "takes), e.g. [0, 1, 2]"
            )
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
                raise ValueError(
                    "seeds repeats each grid trial once per seed; Optuna would treat seed as one more "
                    "parameter to tune (and rank its importance): fix seed in fixed, or use algorithm grid"
                )
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

    def values_of(self, key: str) -> list[Any]:
        """Every value ``key`` may take in this search (fixed, grid, sampled choices; stages too);
        TrialConfig's default when nothing sets it. A sampled range gives its bounds."""
        values = [self.fixed[key]] if key in self.fixed else []
        values += self.grid[key].values if key in self.grid else []
        values += self.sample[key].probe_values() if key in self.sample else []
        for view in stage_views(self) if self.stages else ():
            values += view.space.values_of(key)
        return list(dict.fromkeys(values or [default_of(key)]))


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

    states: Counter[tuple[tuple[bool, ...], ...]] = Counter(
        {tuple(passes(k, fixed.get(k, default_of(k))) for k in tests): 1}
    )
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
                    following[(*state[:slot], kind, *state[slot + 1 :])] += n * m
            if len(following) > limit:
                return None
        states = following
    return sum(states.values())


@dataclass(frozen=True)
class StageView:
    """One stage as a one-stage search space; ``name`` is '' for a search without stages."""

    name: str
    space: SearchSpace
    init_from: str | None = None


def stage_views(space: SearchSpace) -> list[StageView]:
    """The stages of ``space`` in order (a search without stages is one unnamed stage)."""
    if not space.stages:
        return [StageView("", space)]
    return [
        StageView(
            name,
            space.model_copy(
                update={
                    "fixed": {**space.fixed, **stage.fixed},
                    "grid": stage.grid,
                    "sample": stage.sample,
                    "stages": {},
                    "description": stage.description or space.description,
                }
            ),
            stage.init_from.stage if stage.init_from else None,
        )
        for name, stage in space.stages.items()
    ]
