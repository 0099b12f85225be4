"""Build a Ray Tune ``Tuner`` from a ``SearchSpace``, and connect to Ray.

The search space becomes Ray's ``param_space`` (grid combinations as one
``tune.grid_search`` over whole dicts, so conditional grid keys work; sampled keys as
Tune distributions) or, for ``optuna``, a define-by-run function given to
``OptunaSearch``. Each trial runs ``trainables.ray_trainable.train`` with the CPUs and
GPUs the file asks for, one report per epoch, checkpoints every N epochs (a bounded
number kept) under the storage path, and retries from its last checkpoint up to
``max_failures`` times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler
from ray.tune.search import BasicVariantGenerator, Searcher

from orchestrator.searchfile.space import SampleKey, SearchSpace, matches
from trainables.config import TrialConfig
from trainables.ray_trainable import train

GRID_KEY = "grid"


# ------------------------------------------------------------- resolving a config


@dataclass(frozen=True)
class TrialResolver:
    """Ray's config -> flat trial values: fixed keys, the grid combination, sampled keys.

    A conditional sampled key whose condition does not hold arrives as None and is left
    out, so the trial keeps ``TrialConfig``'s default.
    """

    fixed: dict[str, Any]
    conditional: frozenset[str] = field(default_factory=frozenset)

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        return {**self.fixed, **self.varying(config)}

    def varying(self, config: dict[str, Any]) -> dict[str, Any]:
        """The trial's own values of the keys that vary in its search (grid and sampled)."""
        values = dict(config.get(GRID_KEY, {}))
        for key, value in config.items():
            if key == GRID_KEY or (key in self.conditional and value is None):
                continue
            values[key] = value
        return values


# ------------------------------------------------------------------ search spaces


def _tune_distribution(spec: SampleKey) -> Any:
    low_high = spec.arguments(spec.kind)
    return {
        "uniform": lambda: tune.uniform(*low_high),
        "loguniform": lambda: tune.loguniform(*low_high),
        "int": lambda: tune.randint(low_high[0], low_high[1] + 1),
        "choice": lambda: tune.choice(list(low_high)),
    }[spec.kind]()


@dataclass(frozen=True)
class ConditionalSample:
    """``tune.sample_from`` body: draw from ``spec`` only where its ``when`` holds."""

    spec: SampleKey
    fixed: dict[str, Any]

    def __call__(self, config: dict[str, Any]) -> Any:
        values = {**self.fixed, **config, **config.get(GRID_KEY, {})}
        if not matches(self.spec.when, values):
            return None
        return _tune_distribution(self.spec).sample()


def param_space(space: SearchSpace, combinations: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Ray ``param_space`` for the grid and random algorithms (sampled keys drawn per grid point).

    ``combinations``: the grid as whole combinations, given (a later stage's, each with the
    checkpoint it starts from) instead of built from ``space.grid``.
    """
    out: dict[str, Any] = {}
    if combinations is not None:
        out[GRID_KEY] = tune.grid_search(combinations)
    elif any(spec.when for spec in space.grid.values()):
        # conditional grid keys: one grid over whole combinations
        out[GRID_KEY] = tune.grid_search(space.grid_combinations())
    else:  # plain product: one grid per key, so Ray's progress table shows each key
        out.update({key: tune.grid_search(spec.values) for key, spec in space.grid.items()})
    for key, spec in space.sample.items():
        out[key] = tune.sample_from(ConditionalSample(spec, space.fixed)) if spec.when else _tune_distribution(spec)
    return out


@dataclass(frozen=True)
class OptunaSpace:
    """Define-by-run space for Optuna: grid keys become categorical, conditions are honoured."""

    space: SearchSpace

    def __call__(self, trial: Any) -> None:
        chosen: dict[str, Any] = {}
        for key, spec in self.space.grid.items():
            if matches(spec.when, {**self.space.fixed, **chosen}):
                chosen[key] = trial.suggest_categorical(key, spec.values)
        for key, spec in self.space.sample.items():
            if not matches(spec.when, {**self.space.fixed, **chosen}):
                continue
            args = spec.arguments(spec.kind)
            if spec.kind == "uniform":
                trial.suggest_float(key, *args)
            elif spec.kind == "loguniform":
                trial.suggest_float(key, *args, log=True)
            elif spec.kind == "int":
                trial.suggest_int(key, *args)
            else:
                trial.suggest_categorical(key, list(args))


@dataclass(frozen=True)
class StudyRef:
    """Where an Optuna search keeps its study: an SQLAlchemy URL and the study's name."""

    storage: str
    name: str


def search_algorithm(space: SearchSpace, study: StudyRef | None = None) -> Searcher | BasicVariantGenerator:
    s = space.search
    if s.algorithm == "optuna":
        import optuna

        from orchestrator.studies.study import StudySearch, make_sampler, rdb_storage

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        if study is None:
            raise ValueError("an Optuna search needs its study's storage and name")
        metric = s.metrics if s.multi_objective else s.metric
        mode = s.modes if s.multi_objective else s.mode
        # a define-by-run space takes metric and mode here, not from TuneConfig
        return StudySearch(
            space=OptunaSpace(space),
            metric=metric,
            mode=mode,
            sampler=make_sampler(s.sampler_name, s.sampler_seed, s.sampler_options),
            storage=rdb_storage(study.storage),
            study_name=study.name,
        )
    return BasicVariantGenerator(random_state=s.sampler_seed)


def max_epochs(space: SearchSpace) -> int:
    """The most epochs any trial of ``space`` trains (ASHA's ``max_t``)."""
    if "epochs" in space.fixed:
        return int(space.fixed["epochs"])
    if "epochs" in space.grid:
        return max(int(v) for v in space.grid["epochs"].values)
    if "epochs" in space.sample:
        return max(int(v) for v in space.sample["epochs"].probe_values())
    return int(TrialConfig.model_fields["epochs"].default)


def scheduler(space: SearchSpace) -> TrialScheduler:
    sched = space.search.scheduler
    if sched.type == "fifo":
        return FIFOScheduler()
    # with Optuna, metric and mode go to the searcher and the scheduler, not to TuneConfig (Ray refuses both)
    own = {"metric": space.search.metric, "mode": space.search.mode} if space.search.algorithm == "optuna" else {}
    # time is the trial's own epoch counter, which survives restarts exactly (Tune's iteration
    # count restarts from the checkpoint Tune remembers, which may be older than the newest one)
    return ASHAScheduler(
        time_attr="epoch",
        max_t=sched.max_t or max_epochs(space),
        grace_period=sched.grace_period,
        reduction_factor=sched.reduction_factor,
        **own,
    )


# -------------------------------------------------------------------- the tuner


def trainable(space: SearchSpace, tracker: Any) -> Any:
    """The function trainable with its fixed arguments and per-trial resources."""
    fn = tune.with_parameters(
        train,
        resolve=TrialResolver(space.fixed, frozenset(space.conditional_keys())),
        tracker=tracker,
        checkpoint_every=space.checkpoint.every,
        keep_checkpoints=space.checkpoint.keep,
    )
    return tune.with_resources(fn, {"cpu": space.resources.cpu, "gpu": space.resources.gpu})


def run_config(
    space: SearchSpace, storage_path: str, experiment: str, callbacks: list[tune.Callback]
) -> tune.RunConfig:
    return tune.RunConfig(
        name=experiment,
        storage_path=storage_path,
        # num_to_keep stays None: the trainable prunes payloads itself (see ray_trainable)
        checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
        failure_config=tune.FailureConfig(max_failures=space.max_failures),
        callbacks=callbacks,
        verbose=1,
    )


def build_tuner(
    space: SearchSpace,
    *,
    storage_path: str,
    experiment: str,
    tracker: Any,
    callbacks: list[tune.Callback] | None = None,
    study: StudyRef | None = None,
    combinations: list[dict[str, Any]] | None = None,
) -> tune.Tuner:
    """A ``tune.Tuner`` running ``space`` under ``storage_path/experiment``."""
    s = space.search
    optuna = s.algorithm == "optuna"
    return tune.Tuner(
        trainable(space, tracker),
        param_space={} if optuna else param_space(space, combinations),
        tune_config=tune.TuneConfig(
            metric=None if optuna else s.metric,
            mode=None if optuna else s.mode,
            search_alg=search_algorithm(space, study),
            scheduler=scheduler(space),
            num_samples=s.num_samples,
            max_concurrent_trials=s.max_concurrent_trials,
            # a slot's next trial runs in the same worker: no process start, no imports again. Such a
            # trial starts within milliseconds of Tune creating it, before Tune's next snapshot of its
            # state (every 2 s) holds it; a driver killed then lost the trial on resume while the
            # study and MLflow kept what it did, and the rewound searcher suggested its point again
            # (9 COMPLETE for 8 Ray trials). So every trial first waits until the saved snapshot
            # lists it (trainables.tune_state); with that, Optuna searches reuse workers too
            reuse_actors=True,
        ),
        run_config=run_config(space, storage_path, experiment, callbacks or []),
    )
