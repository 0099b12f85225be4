"""Optuna searches: the study in RDB storage, its sampler, and its Pareto front.

A search with ``algorithm: optuna`` runs through Ray Tune's ``OptunaSearch`` on an Optuna
study kept in RDB storage: a SQLite file beside the MLflow store by default
(``normlab_runs/optuna.db``), any SQLAlchemy URL with ``search.storage``. The study is
named after the search and its start time (the search folder's name, e.g.
``robustnorm_optuna-20261128-101500``), so ``normlab resume`` continues the same study and
``optuna-dashboard sqlite:///normlab_runs/optuna.db`` (or ``optuna`` itself) opens it.

``StudySearch`` adds normlab's bookkeeping to Ray's searcher: every Optuna trial carries
its Ray trial id as a user attribute (the MLflow run carries it as a tag), and a
resumed search marks FAIL the trials that the study had handed out after Ray's last
snapshot of the searcher, which Ray will never run (a driver killed between the two), so
that no trial is left RUNNING forever and every Ray trial is in the study exactly once.
Errored Ray trials are told to the study as FAIL (Ray's searcher does that). One that
``normlab resume`` retries and that then finishes cannot be told again: Optuna never changes
a finished trial, and Ray's searcher drops a second completion. ``record_retried`` adds it to
the study as a COMPLETE copy (same parameters, the final values, ``normlab.retry_of`` = the
FAIL trial's number), so the sampler, the Pareto front and the importances all count it.

Samplers: ``tpe`` (default for one metric), ``nsgaii`` (default for several), ``cmaes``
(one metric), ``qmc``, ``random``; all seeded with ``search.sampler_seed``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from ray.tune.search.optuna import OptunaSearch

log = logging.getLogger("normlab.study")
DEFAULT_FILE = "optuna.db"
RAY_TRIAL_ATTR = "ray_trial_id"


def default_storage(tracking_uri: str, workdir: Path | None = None) -> str:
    """The study's storage beside a local SQLite MLflow store, else in ``normlab_runs`` here."""
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).parent / DEFAULT_FILE}"
    base = (workdir or Path.cwd()).resolve() / "normlab_runs"
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / DEFAULT_FILE}"


def make_sampler(name: str, seed: int) -> Any:
    import optuna

    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "nsgaii": lambda: optuna.samplers.NSGAIISampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed, warn_independent_sampling=False),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
    }
    return samplers[name]()


def rdb_storage(url: str) -> Any:
    import optuna

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 30}} if url.startswith("sqlite") else {})


def load_study(url: str, study_name: str) -> Any:
    """The study of a search, read back from its storage."""
    import optuna

    return optuna.load_study(study_name=study_name, storage=rdb_storage(url))


class StudySearch(OptunaSearch):
    """Ray Tune's ``OptunaSearch`` with the Ray trial id on each Optuna trial, and orphaned
    trials marked FAIL when a search resumes (see the module doc)."""

    def suggest(self, trial_id: str) -> dict | None:
        new = trial_id not in self._ot_trials
        params = super().suggest(trial_id)
        if new and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(RAY_TRIAL_ATTR, trial_id)
        return params

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.fail_orphans()

    def fail_orphans(self) -> list[int]:
        """Mark FAIL the study's RUNNING trials that Ray does not know; returns their numbers."""
        from optuna.trial import TrialState

        known = {t._trial_id for t in self._ot_trials.values()}
        storage = self._ot_study._storage
        orphans = []
        for trial in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial._trial_id in known:
                continue
            storage.set_trial_user_attr(trial._trial_id, "normlab.lost",
                                        "handed out after Ray's last snapshot of the searcher; the driver died "
                                        "before Ray ran it")
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            orphans.append(trial.number)
        if orphans:
            log.warning("study %s: trial(s) %s were handed out but never run (the driver died): marked FAIL",
                        self._study_name, orphans)
        return orphans


def record_retried(url: str, study_name: str, metrics: list[str], finished: dict[str, dict[str, Any]]) -> list[str]:
    """Add a COMPLETE copy of each FAIL trial whose Ray trial has since finished (``finished``:
    Ray trial id -> its last result); returns those Ray trial ids. A trial already COMPLETE in
    the study (told by Ray, or copied by an earlier call) is left alone."""
    import optuna
    from optuna.trial import TrialState

    study = load_study(url, study_name)
    by_ray: dict[str, list[Any]] = {}
    for trial in study.get_trials(deepcopy=False):
        if RAY_TRIAL_ATTR in trial.user_attrs:
            by_ray.setdefault(trial.user_attrs[RAY_TRIAL_ATTR], []).append(trial)
    added = []
    for ray_id, result in finished.items():
        trials = by_ray.get(ray_id, [])
        failed = [t for t in trials if t.state == TrialState.FAIL]
        if not failed or any(t.state == TrialState.COMPLETE for t in trials):
            continue
        values = [result.get(m) for m in metrics]
        if any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in values):
            continue  # Ray would not have told these either
        source = failed[0]
        study.add_trial(optuna.trial.create_trial(
            params=source.params, distributions=source.distributions, values=[float(v) for v in values],
            user_attrs={**source.user_attrs, "normlab.retry_of": source.number}))
        added.append(ray_id)
    if added:
        log.info("study %s: trial(s) %s failed, were retried and finished: added as COMPLETE", study_name, added)
    return added


def pareto_front(points: list[tuple[float, ...]], modes: list[str]) -> list[int]:
    """Indices of the non-dominated points (``modes``: max or min per coordinate)."""
    signs = [1.0 if m == "max" else -1.0 for m in modes]
    scored = [tuple(s * v for s, v in zip(signs, p)) for p in points]

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [i for i, p in enumerate(scored) if not any(dominates(q, p) for j, q in enumerate(scored) if j != i)]
