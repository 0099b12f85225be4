"""The Optuna searcher's state pickles and restores for every sampler, whatever the sampler
keeps: thread locks come back fresh, the RNG state, the caches and the study's trials come
back as they were; a sampler that keeps something truly unpicklable is one clear error
naming it. (Optuna 5.1's NSGA-II keeps a ``threading.Lock``: see docs/design.md, known traps.)"""

from __future__ import annotations

import pickle
import socket
import subprocess
import sys
import textwrap
import threading
from typing import Any

import numpy as np
import optuna
import pytest
from conftest import normlab_env
from ray import cloudpickle, tune

from orchestrator.running.tuner import StudyRef, search_algorithm
from orchestrator.searchfile.load import load_space
from orchestrator.studies.study import SAMPLER_CLASSES, SearcherStateError, StudySearch, dumps_state, make_sampler

SAMPLERS = list(SAMPLER_CLASSES)
SPACE = """
name: x
fixed: {{epochs: 2}}
grid: {{norm: [batchnorm, robustnorm]}}
sample:
  norm_power: {{uniform: [0.1, 1.0], when: {{norm: [robustnorm]}}}}
  lr: {{loguniform: [0.02, 0.2]}}
search: {{algorithm: optuna, sampler: {sampler}, num_samples: 8, {metric}}}
"""


def space_of(tmp_path, sampler: str) -> Any:
    metric = "metric: [clean_acc, adv_acc], mode: [max, max]" if sampler == "nsgaii" else "metric: clean_acc, mode: max"
    path = tmp_path / f"{sampler}.yaml"
    path.write_text(textwrap.dedent(SPACE.format(sampler=sampler, metric=metric)))
    return load_space(str(path))[0]


def study_ref(tmp_path, sampler: str) -> StudyRef:
    return StudyRef(f"sqlite:///{tmp_path / 'optuna.db'}", f"study-{sampler}")


def searched(tmp_path, sampler: str, trials: int = 4) -> StudySearch:
    """The searcher ``search_algorithm`` builds, after ``trials`` Ray trials have finished."""
    searcher = search_algorithm(space_of(tmp_path, sampler), study_ref(tmp_path, sampler))
    for i in range(trials):
        params = searcher.suggest(f"ray-{i}")
        searcher.on_trial_complete(f"ray-{i}", result={"clean_acc": params["lr"], "adv_acc": 0.1 * i})
    return searcher


def found(obj: Any, kinds: tuple[type, ...], path: str = "sampler", seen: set[int] | None = None) -> dict[str, Any]:
    """Every object of ``kinds`` reachable from ``obj`` through attributes, items and elements, by path."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, type(None))):
        return {}
    seen.add(id(obj))
    if isinstance(obj, kinds):
        return {path: obj}
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        parts = [(f"[{k!r}]", v) for k, v in obj.items()]
    elif isinstance(obj, (list, tuple)):
        parts = [(f"[{i}]", v) for i, v in enumerate(obj)]
    else:
        parts = [(f".{k}", v) for k, v in getattr(obj, "__dict__", {}).items()]
    for name, part in parts:
        out.update(found(part, kinds, path + name, seen))
    return out


def rng_states(sampler: Any) -> dict[str, Any]:
    """The state of every RNG the sampler keeps (wherever it keeps them), comparable with ==."""
    states = {}
    for path, rng in found(sampler, (np.random.RandomState, np.random.Generator)).items():
        if isinstance(rng, np.random.RandomState):
            name, keys, pos, has_gauss, gauss = rng.get_state()
            states[path] = (name, keys.tobytes(), pos, has_gauss, gauss)
        else:
            states[path] = repr(rng.bit_generator.state)
    return states


LOCKS = (type(threading.Lock()), type(threading.RLock()))


def trials_of(searcher: StudySearch) -> list[tuple]:
    return [(t.number, t.state, t.values, t.params) for t in searcher._ot_study.get_trials(deepcopy=False)]


def assert_same_search(restored: StudySearch, original: StudySearch, earlier: list[tuple]) -> None:
    """Every earlier trial, the same RNG states, every lock rebuilt, and it suggests again."""
    assert restored is not original and restored._sampler is not original._sampler
    assert restored._ot_study.sampler is restored._sampler  # still one sampler, the study's
    assert trials_of(restored) == earlier  # the study reconnected to its storage and sees every trial
    assert rng_states(restored._sampler) == rng_states(original._sampler)
    locks = found(original._sampler, LOCKS)
    rebuilt = found(restored._sampler, LOCKS)
    assert rebuilt.keys() == locks.keys()  # rebuilt, not dropped
    assert all(type(rebuilt[k]) is type(locks[k]) and rebuilt[k] is not locks[k] for k in locks)
    params = restored.suggest("ray-next")
    assert 0.02 <= params["lr"] <= 0.2 and params["norm"] in ("batchnorm", "robustnorm")
    restored.on_trial_complete("ray-next", result={"clean_acc": 0.5, "adv_acc": 0.5})
    assert [t[:2] for t in trials_of(restored)[:-1]] == [t[:2] for t in earlier]
    assert trials_of(restored)[-1][1] == optuna.trial.TrialState.COMPLETE


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_searcher_pickles_and_comes_back_with_its_history(tmp_path, sampler):
    searcher = searched(tmp_path, sampler)
    earlier = trials_of(searcher)
    assert len(earlier) == 4 and all(t[1] == optuna.trial.TrialState.COMPLETE for t in earlier)
    assert rng_states(searcher._sampler)  # it keeps an RNG ...
    assert rng_states(searcher._sampler) != rng_states(make_sampler(sampler, 0))  # ... which the search moved on
    for dumps in (pickle.dumps, cloudpickle.dumps):  # the standard pickle, and Ray's
        assert_same_search(pickle.loads(dumps(searcher)), searcher, earlier)
        earlier = trials_of(searcher)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_searcher_checkpoint_restores_into_a_fresh_searcher(tmp_path, sampler):
    searcher = searched(tmp_path, sampler)
    earlier = trials_of(searcher)
    path = tmp_path / "searcher-state.pkl"
    searcher.save(str(path))
    fresh = search_algorithm(space_of(tmp_path, sampler), study_ref(tmp_path, sampler))  # what a resume builds
    assert rng_states(fresh._sampler) != rng_states(searcher._sampler)
    fresh.restore(str(path))
    assert_same_search(fresh, searcher, earlier)
    assert pickle.loads(path.read_bytes()).keys() == searcher.__dict__.keys()  # the dict Ray's restore reads


def test_the_search_state_ray_tune_writes_comes_back(tmp_path):
    """``tuner.pkl``, as Tune writes it when a search starts and reads it on ``Tuner.restore``."""
    searcher = searched(tmp_path, "nsgaii")
    earlier = trials_of(searcher)

    def trainable(config):
        pass

    tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=2),
        run_config=tune.RunConfig(name="e", storage_path=str(tmp_path)),
    )
    restored = tune.Tuner.restore(str(tmp_path / "e"), trainable=trainable)._local_tuner._tune_config.search_alg
    assert isinstance(restored, StudySearch)
    assert_same_search(restored, searcher, earlier)


def test_thread_primitives_come_back_fresh_and_still_shared():
    lock = threading.Lock()
    lock.acquire()
    condition = threading.Condition(threading.RLock())
    event = threading.Event()
    event.set()
    state = {
        "lock": lock,
        "again": lock,
        "condition": condition,
        "event": event,
        "local": threading.local(),
        "rng": np.random.RandomState(3),
    }
    state["rng"].random_sample(5)
    back = pickle.loads(dumps_state(state))
    assert back["lock"] is back["again"] and not back["lock"].locked()  # fresh, released, one lock
    assert isinstance(back["condition"]._lock, type(threading.RLock())) and back["event"].is_set()
    assert isinstance(back["local"], threading.local)
    assert back["rng"].random_sample() == state["rng"].random_sample()


@pytest.mark.parametrize(
    ("sampler", "where", "make", "kind"),
    [
        ("nsgaii", "sampler._probe", lambda: (n for n in range(3)), "builtins.generator"),
        ("tpe", "sampler._random_sampler._probe", lambda: socket.socket(), "socket.socket"),
    ],
)
def test_a_sampler_that_keeps_something_unpicklable_is_one_clear_error(tmp_path, sampler, where, make, kind):
    searcher = searched(tmp_path, sampler, trials=1)
    owner = searcher._sampler._random_sampler if where.count(".") == 2 else searcher._sampler
    owner._probe = make()
    try:
        errors = []
        for save in (pickle.dumps, cloudpickle.dumps, lambda s: s.save(str(tmp_path / "state.pkl"))):
            with pytest.raises(SearcherStateError) as info:
                save(searcher)
            errors.append(str(info.value))
    finally:
        if isinstance(owner._probe, socket.socket):
            owner._probe.close()
    message = errors[0]
    assert errors == [message] * 3 and "\n" not in message
    assert message.startswith(
        f"the {sampler} sampler of Optuna {optuna.__version__} keeps a {kind} ({where}) which cannot be saved"
    )
    assert "choose another sampler" in message and not (tmp_path / "state.pkl").exists()


def test_an_unpicklable_part_outside_the_sampler_names_the_search_and_its_sampler(tmp_path):
    searcher = searched(tmp_path, "random", trials=1)
    searcher._probe = (n for n in range(3))
    with pytest.raises(
        SearcherStateError,
        match=r"^the Optuna search \(random sampler, Optuna [\d.]+\) keeps a "
        r"builtins\.generator \(searcher\._probe\) which cannot be saved",
    ):
        pickle.dumps(searcher)


@pytest.mark.slow
def test_submit_with_a_sampler_that_cannot_be_saved_fails_with_one_line(tmp_path):
    """The real ``normlab submit``, its NSGA-II sampler holding a generator: one line on stderr, exit 2."""
    (tmp_path / "space.yaml").write_text(
        textwrap.dedent(SPACE.format(sampler="nsgaii", metric="metric: [clean_acc, adv_acc], mode: [max, max]"))
    )
    (tmp_path / "submit.py").write_text(
        textwrap.dedent("""
        import sys

        from orchestrator.running.rayenv import prepare_environment

        prepare_environment(local_ray=True)  # before ray is imported, as the command does
        import orchestrator.studies.study as study

        made = study.make_sampler


        def make_sampler(name, seed, options=None):
            sampler = made(name, seed, options)
            sampler._probe = (n for n in range(3))
            return sampler


        study.make_sampler = make_sampler
        from orchestrator.cli import main

        sys.argv = ["normlab", *sys.argv[1:]]
        main()
    """)
    )
    done = subprocess.run(
        [sys.executable, "submit.py", "submit", "space.yaml", "--num-cpus", "1"],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env=normlab_env(),
    )
    errors = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert errors == [errors[0]] and errors[0].startswith(
        f"error: the nsgaii sampler of Optuna {optuna.__version__} keeps a builtins.generator (sampler._probe) "
        "which cannot be saved"
    ), done.stderr[-3000:]
