"""Optuna searches: the study in RDB storage, its sampler, and its Pareto front.

A search with ``algorithm: optuna`` runs through Ray Tune's ``OptunaSearch`` on an Optuna
study kept in RDB storage: a SQLite file beside the MLflow store by default
(``normlab_runs/optuna.db``), any SQLAlchemy URL with ``search.storage``: for a search whose
trials run on several nodes, a database server such as PostgreSQL,
``postgresql://USER@HOST:PORT/DATABASE``, without the password (the validator refuses one:
normlab stores the URL), which libpq reads from ``PGPASSWORD`` or a password file
(``PGPASSFILE``, ``~/.pgpass``) in the driver's environment; only the driver opens the study.
``sqlalchemy_url`` opens a plain ``postgresql://`` with psycopg2 when psycopg 3 is missing. The study is
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

Pickling: Ray Tune pickles the searcher into the Tuner's state (``tuner.pkl``, when the
search starts) and into its searcher checkpoints (``searcher-state-*.pkl``, through ``save``
and ``restore``), and a resumed search is rebuilt from both. A sampler may keep things that
pickle cannot write: Optuna 5.1's NSGA-II keeps a ``threading.Lock``. ``StudySearch`` pickles
its whole state (sampler and study included) with ``dumps_state``, Ray's cloudpickle with one
addition: thread primitives (locks, RLocks, conditions, thread-local storage) are written
as "make a fresh one" and come back new and released, every reference to one still sharing
it. Everything else the sampler keeps comes back as it was: its RNG state (a resumed study
continues the same random stream), its caches and its generation bookkeeping. The study
reconnects to its RDB storage on load and reads every trial from there. Anything else that
cannot be pickled (a generator, a socket) is a ``SearcherStateError`` when the search
starts: one line naming the sampler, the Optuna release and what it keeps, never a traceback.
"""

from __future__ import annotations

import io
import logging
import math
import pickle
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ray import cloudpickle
from ray.tune.search.optuna import OptunaSearch

from orchestrator.searchfile.space import sqlalchemy_url

log = logging.getLogger("normlab.study")
DEFAULT_FILE = "optuna.db"
RAY_TRIAL_ATTR = "ray_trial_id"
STATE_KEY = "normlab.searcher_state"  # what StudySearch.__getstate__ returns: its state, pickled
# normlab's sampler names, by the Optuna class that make_sampler builds for each
SAMPLER_CLASSES = {
    "tpe": "TPESampler",
    "nsgaii": "NSGAIISampler",
    "cmaes": "CmaEsSampler",
    "qmc": "QMCSampler",
    "random": "RandomSampler",
}


def default_storage(tracking_uri: str, workdir: Path | None = None) -> str:
    """The study's storage beside a local SQLite MLflow store, else in ``normlab_runs`` here."""
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri.removeprefix('sqlite:///')).parent / DEFAULT_FILE}"
    base = (workdir or Path.cwd()).resolve() / "normlab_runs"
    base.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{base / DEFAULT_FILE}"


def make_sampler(name: str, seed: int, options: Mapping[str, Any] | None = None) -> Any:
    """The Optuna sampler normlab calls ``name``, seeded, with a search file's ``sampler_options``
    (checked by ``searchfile.sampler_options``) passed to its constructor as they are."""
    import optuna

    quiet = {"warn_independent_sampling": False}  # every grid key is sampled independently by these
    samplers = {
        "tpe": (optuna.samplers.TPESampler, {}),
        "nsgaii": (optuna.samplers.NSGAIISampler, {}),
        "cmaes": (optuna.samplers.CmaEsSampler, quiet),
        "qmc": (optuna.samplers.QMCSampler, quiet),
        "random": (optuna.samplers.RandomSampler, {}),
    }
    cls, defaults = samplers[name]
    return cls(seed=seed, **defaults, **dict(options or {}))


def sampler_name(sampler: Any) -> str:
    """normlab's name of ``sampler`` (``nsgaii``), else its class name."""
    names = {cls: name for name, cls in SAMPLER_CLASSES.items()}
    for cls in type(sampler).__mro__:
        if cls.__name__ in names:
            return names[cls.__name__]
    return type(sampler).__name__


class StudyStorageError(RuntimeError):
    """The study's database cannot be opened (unreachable, or it refused the connection): one
    line with the driver's reason and where a password comes from, never the URL."""


class SearcherStateError(pickle.PicklingError):
    """The searcher keeps something that cannot be pickled, so Ray Tune can neither save nor
    resume the search; the message is one line naming the sampler and what it keeps."""


def _rebuilt_condition(condition: threading.Condition) -> tuple[Any, ...]:
    return threading.Condition, (condition._lock,)  # the lock pickled in turn: still shared


def _rebuilt_local(local: threading.local) -> tuple[Any, ...]:
    type(local)()  # a thread-local that needs arguments could not be made again: refuse it now
    return type(local), ()


# thread primitives, written as a fresh one of the same kind (a lock comes back released)
_REBUILT: dict[type, Callable[[Any], tuple[Any, ...]]] = {
    type(threading.Lock()): lambda _: (threading.Lock, ()),
    type(threading.RLock()): lambda _: (threading.RLock, ()),
    threading.Condition: _rebuilt_condition,
}


class _StatePickler(cloudpickle.Pickler):
    """Ray's cloudpickle, writing thread primitives as fresh ones (see the module doc)."""

    def reducer_override(self, obj: Any) -> Any:
        rebuild = _REBUILT.get(type(obj))
        if rebuild is not None:
            return rebuild(obj)
        if isinstance(obj, threading.local):
            return _rebuilt_local(obj)
        return super().reducer_override(obj)


def dumps_state(obj: Any) -> bytes:
    """``obj`` pickled with its thread primitives made fresh on load; ``pickle.loads`` reads it."""
    buffer = io.BytesIO()
    _StatePickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(obj)
    return buffer.getvalue()


def _parts(obj: Any) -> Iterator[tuple[str, Any]]:
    """What pickle writes of ``obj``: items, elements, or the state of its reduction, named."""
    if isinstance(obj, dict):
        yield from ((f"[{k!r}]", v) for k, v in obj.items())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        yield from ((f"[{i}]", v) for i, v in enumerate(obj))
    elif not isinstance(obj, type):
        try:
            reduced = obj.__reduce_ex__(pickle.HIGHEST_PROTOCOL)
        except Exception:  # noqa: BLE001  (it refuses to be pickled at all: a leaf)
            return
        if not isinstance(reduced, tuple) or len(reduced) < 3:
            return
        state = reduced[2][0] if isinstance(reduced[2], tuple) and len(reduced[2]) == 2 else reduced[2]
        if isinstance(state, dict):
            yield from ((f".{k}", v) for k, v in state.items())
        yield from ((f"<arg {i}>", v) for i, v in enumerate(reduced[1] or ()))


def _unpicklable(obj: Any, path: str, depth: int = 0) -> tuple[str, Any, Exception] | None:
    """The innermost part of ``obj`` that cannot be pickled: its path, itself, the error."""
    try:
        dumps_state(obj)
        return None
    except Exception as exc:  # noqa: BLE001
        error = exc
    for name, part in _parts(obj) if depth < 12 else ():
        found = _unpicklable(part, path + name, depth + 1)
        if found is not None:
            return found
    return path, obj, error


def rdb_storage(url: str) -> Any:
    """Optuna's storage at ``url``. A PostgreSQL URL holds no password (the search file's
    validator refuses one): libpq takes it from ``PGPASSWORD`` or a password file
    (``PGPASSFILE``, ``~/.pgpass``) in the driver's environment, where the study is opened."""
    import optuna

    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 30}}
    elif url.startswith("sqlite"):
        engine_kwargs = {"connect_args": {"timeout": 30}}
    else:  # a server: a connection it dropped while the search ran is replaced, not failed on
        engine_kwargs = {"pool_pre_ping": True}
    from sqlalchemy.exc import OperationalError

    try:
        return optuna.storages.RDBStorage(sqlalchemy_url(url), engine_kwargs=engine_kwargs)
    except OperationalError as exc:  # unreachable, or it refused us: say so in one line
        reason = " ".join(str(getattr(exc, "orig", None) or exc).split())
        raise StudyStorageError(
            f"cannot open the Optuna study's database (search.storage): {reason}. A database server's "
            "password comes from the environment of the process that opens the study, never from the URL: "
            "PGPASSWORD, or a password file (PGPASSFILE, ~/.pgpass) for PostgreSQL"
        ) from exc


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

    def __getstate__(self) -> dict[str, bytes]:
        """What Ray pickles into the Tuner's state: the whole state, pickled by ``dumps_state``."""
        return {STATE_KEY: self.pickled_state()}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if STATE_KEY in state:  # else a searcher pickled before normlab pickled its own state
            state = pickle.loads(state[STATE_KEY])
        self.__dict__.update(state)

    def save(self, checkpoint_path: str) -> None:
        """Ray's searcher checkpoint: the same dict as ``OptunaSearch.save`` writes (its
        ``restore`` reads it), pickled by ``dumps_state``."""
        data = self.pickled_state()
        with open(checkpoint_path, "wb") as out:
            out.write(data)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.fail_orphans()

    def pickled_state(self) -> bytes:
        """The searcher's attributes, pickled (see the module doc), or a ``SearcherStateError``."""
        state = self.__dict__.copy()
        try:
            return dumps_state(state)
        except Exception as exc:  # pickle raises TypeError, PicklingError, AttributeError...
            raise SearcherStateError(self._unsaveable(state, exc)) from exc

    def _unsaveable(self, state: dict[str, Any], error: Exception) -> str:
        import optuna

        name = sampler_name(self._sampler)
        found = None
        for key in sorted(state, key=lambda k: k != "_sampler"):  # a path through the sampler if there is one
            found = _unpicklable(state[key], "sampler" if key == "_sampler" else f"searcher.{key}")
            if found is not None:
                break
        path, culprit, error = found or ("searcher", state, error)
        reason = " ".join(str(error).split()) or type(error).__name__
        owner = (
            f"the {name} sampler of Optuna {optuna.__version__}"
            if path.startswith("sampler")
            else f"the Optuna search ({name} sampler, Optuna {optuna.__version__})"
        )
        return (
            f"{owner} keeps a {type(culprit).__module__}.{type(culprit).__qualname__} ({path}) which cannot be "
            f"saved ({reason}), so Ray Tune could neither checkpoint nor resume this search; choose another "
            f"sampler (search.sampler: {', '.join(n for n in SAMPLER_CLASSES if n != name)}) or another Optuna release"
        )

    def fail_orphans(self) -> list[int]:
        """Mark FAIL the study's RUNNING trials that Ray does not know; returns their numbers."""
        from optuna.trial import TrialState

        known = {t._trial_id for t in self._ot_trials.values()}
        storage = self._ot_study._storage
        orphans = []
        for trial in self._ot_study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial._trial_id in known:
                continue
            storage.set_trial_user_attr(
                trial._trial_id,
                "normlab.lost",
                "handed out after Ray's last snapshot of the searcher; the driver died before Ray ran it",
            )
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
            orphans.append(trial.number)
        if orphans:
            log.warning(
                "study %s: trial(s) %s were handed out but never run (the driver died): marked FAIL",
                self._study_name,
                orphans,
            )
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
        study.add_trial(
            optuna.trial.create_trial(
                params=source.params,
                distributions=source.distributions,
                values=[float(v) for v in values],
                user_attrs={**source.user_attrs, "normlab.retry_of": source.number},
            )
        )
        added.append(ray_id)
    if added:
        log.info("study %s: trial(s) %s failed, were retried and finished: added as COMPLETE", study_name, added)
    return added


def front_lines(url: str, study_name: str, metrics: list[str], modes: list[str], limit: int = 10) -> list[str]:
    """The study's Pareto front for the terminal: a heading, then one line per trial on it (best
    first by the first objective; at most ``limit``) with its values and parameters."""
    from optuna.trial import TrialState

    study = load_study(url, study_name)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    front = sorted(study.best_trials, key=lambda t: t.values[0], reverse=modes[0] == "max")
    lines = [f"Pareto front of study {study_name}: {len(front)} of {len(complete)} complete trial(s)"]
    for trial in front[:limit]:
        values = ", ".join(f"{m} {v:.4f}" for m, v in zip(metrics, trial.values))
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
        lines.append(f"  trial {trial.number}: {values}  ({params})")
    if len(front) > limit:
        lines.append(f"  ... and {len(front) - limit} more (normlab report NAME --compare ... draws the whole front)")
    return lines


def pareto_front(points: list[tuple[float, ...]], modes: list[str]) -> list[int]:
    """Indices of the non-dominated points (``modes``: max or min per coordinate)."""
    signs = [1.0 if m == "max" else -1.0 for m in modes]
    scored = [tuple(s * v for s, v in zip(signs, p)) for p in points]

    def dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [i for i, p in enumerate(scored) if not any(dominates(q, p) for j, q in enumerate(scored) if j != i)]
