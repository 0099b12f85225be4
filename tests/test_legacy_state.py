"""Searches started and killed by an earlier normlab resume with this one.

``fixtures/legacy_search_state.tar.gz`` holds two searches (random with a conditional key, and
Optuna/TPE) that an earlier commit submitted and SIGKILLed mid-run (``fixtures/README.md`` says
which commit and how to make it again). Ray Tune pickled that normlab's classes into their
state by module path (``tuner.pkl``, the Optuna searcher's state), so moving a module breaks
resuming a search a user already has running; these tests catch that:

- fast: every normlab class the pickles name is still importable at that path;
- slow: ``normlab resume`` finishes both searches into their own MLflow runs and Optuna study.

The searches' record and Tune state hold the absolute path they ran in (the MLflow and Optuna
SQLite URIs, the state-backup callback's folder), and ``normlab resume`` uses those, so the slow
test extracts the fixture at that same path (``WORKDIR``) and holds a lock on it while it runs.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import pickletools
import shutil
import tarfile
import zipfile
from pathlib import Path

import optuna
import pytest
from conftest import run_normlab
from optuna.trial import TrialState
from test_faults import assert_exactly_once, children

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_search_state.tar.gz"
WORKDIR = Path("/tmp/normlab-legacy-fixture")  # where fixtures/make_legacy_state.py ran the searches
LOCK = Path("/tmp/normlab-legacy-fixture.lock")  # the generator takes it too
SEARCHES = ("legacy_random", "legacy_optuna")
EPOCHS = 4
TRIALS = 3

# ----------------------------------------------------------------------- what the pickles name

_STRINGS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
_GETS = {"GET", "BINGET", "LONG_BINGET"}
_PUTS = {"PUT", "BINPUT", "LONG_BINPUT"}
_SILENT = {"MEMOIZE", "FRAME", "PROTO", *_PUTS}


def _pickle_globals(data: bytes, found: set[str]) -> None:
    """The ``module:qualname`` of every global a pickle names (opcodes walked, nothing executed),
    pickles nested in its bytes included."""
    memo: dict[int, object] = {}
    pushed: list[object] = []  # what each opcode pushed; None for anything but a string
    for opcode, arg, _ in pickletools.genops(data):
        name = opcode.name
        if name in _STRINGS:
            pushed.append(arg)
        elif name in _GETS:
            pushed.append(memo.get(arg))
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in _PUTS:
            memo[arg] = pushed[-1] if pushed else None
        elif name == "STACK_GLOBAL":
            found.add(f"{pushed[-2]}:{pushed[-1]}")
            pushed.append(None)
        elif name == "GLOBAL":
            found.add(arg.replace(" ", ":"))
            pushed.append(None)
        elif name not in _SILENT:
            if isinstance(arg, (bytes, bytearray)) and arg[:1] == b"\x80":
                try:
                    _pickle_globals(bytes(arg), found)
                except ValueError:  # bytes that merely start like a pickle
                    pass
            pushed.append(None)


def _json_globals(value: object, found: set[str]) -> None:
    """Ray's JSON state carries pickles as hex strings, some inside JSON strings."""
    if isinstance(value, dict):
        for v in value.values():
            _json_globals(v, found)
    elif isinstance(value, list):
        for v in value:
            _json_globals(v, found)
    elif isinstance(value, str) and value.startswith("80") and len(value) % 2 == 0:
        try:
            _pickle_globals(bytes.fromhex(value), found)
        except ValueError:
            pass
    elif isinstance(value, str) and value[:1] in ("{", "["):
        try:
            _json_globals(json.loads(value), found)
        except ValueError:
            pass


def pickled_globals(root: Path) -> dict[str, set[str]]:
    """``module:qualname`` -> the files under ``root`` whose pickles name it (pickle files, Ray's
    JSON state, PyTorch checkpoints)."""
    where: dict[str, set[str]] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data, found = path.read_bytes(), set()
        if data[:1] == b"\x80":
            _pickle_globals(data, found)
        elif data[:2] == b"PK" and zipfile.is_zipfile(path):  # torch.save
            with zipfile.ZipFile(path) as archive:
                for member in archive.namelist():
                    if member.endswith(".pkl"):
                        _pickle_globals(archive.read(member), found)
        elif path.suffix == ".json":
            try:
                _json_globals(json.loads(data), found)
            except ValueError:
                pass
        for ref in found:
            where.setdefault(ref, set()).add(str(path.relative_to(root)))
    return where


def test_every_normlab_class_the_legacy_state_pickled_still_imports(tmp_path):
    with tarfile.open(FIXTURE) as tar:
        tar.extractall(tmp_path, filter="data")
    where = pickled_globals(tmp_path / "normlab_runs")
    ours = {
        ref: files for ref, files in where.items() if ref.split(".")[0].split(":")[0] in ("orchestrator", "trainables")
    }
    # the fixture does hold normlab's classes (else this test would prove nothing) ...
    assert {
        "orchestrator.callbacks:TrialRunsCallback",
        "orchestrator.study:StudySearch",
        "orchestrator.tuner:OptunaSpace",
    } <= set(ours), sorted(where)
    missing = []
    for ref, files in sorted(ours.items()):  # ... and each still resolves where the pickle looks for it
        module, qualname = ref.split(":")
        try:
            target = importlib.import_module(module)
            for part in qualname.split("."):
                target = getattr(target, part)
        except (ImportError, AttributeError) as exc:
            missing.append(f"{ref} ({type(exc).__name__}: {exc}), named in {min(files)}")
    assert not missing, "the legacy state names code this normlab lacks:\n" + "\n".join(missing)


# ----------------------------------------------------------------------------- resuming it


@pytest.fixture
def legacy_workdir():
    """The fixture extracted at the path it was made in, for this test alone."""
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another run of this test, or the generator
        if WORKDIR.exists():
            if not (WORKDIR / "legacy_fixture.json").exists():
                pytest.fail(f"{WORKDIR} exists and is not a leftover of this fixture: remove it to run this test")
            shutil.rmtree(WORKDIR)
        WORKDIR.mkdir(parents=True)
        try:
            with tarfile.open(FIXTURE) as tar:
                tar.extractall(WORKDIR, filter="data")
            facts = json.loads((WORKDIR / "legacy_fixture.json").read_text())
            assert facts["workdir"] == str(WORKDIR), facts
            yield WORKDIR
        finally:
            shutil.rmtree(WORKDIR, ignore_errors=True)


@pytest.mark.slow
def test_searches_killed_by_an_earlier_normlab_resume_to_the_end(legacy_workdir):
    from orchestrator.studies.study import RAY_TRIAL_ATTR

    for name in SEARCHES:
        resumed = run_normlab("resume", name, "--num-cpus", "2", cwd=legacy_workdir)
        assert resumed.returncode == 0, (name, resumed.stderr[-4000:])
        assert f"resuming search {name}-" in resumed.stderr and resumed.stdout.count(" OK ") == TRIALS, resumed.stdout

    runs = {}
    for name in SEARCHES:
        client, trials = children(legacy_workdir, name)
        assert len(trials) == TRIALS, [
            t.data.tags.get("normlab.trial_name") for t in trials
        ]  # the runs from before the kill
        for run in trials:
            assert run.info.status == "FINISHED", (name, run.data.tags)
            assert_exactly_once(client, run, EPOCHS)
        parents = [
            r for r in client.search_runs([trials[0].info.experiment_id]) if "mlflow.parentRunId" not in r.data.tags
        ]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED", (name, parents)
        assert "normlab.resumed_at" in parents[0].data.tags, parents[0].data.tags
        runs[name] = {run.data.tags["normlab.trial_id"]: run for run in trials}

    url = f"sqlite:///{legacy_workdir / 'normlab_runs' / 'optuna.db'}"
    (study_name,) = optuna.get_all_study_names(url)
    study = optuna.load_study(study_name=study_name, storage=url)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    ray_ids = [t.user_attrs[RAY_TRIAL_ATTR] for t in complete]
    assert sorted(ray_ids) == sorted(runs["legacy_optuna"])  # every Ray trial in the study exactly once
    for trial in study.trials:  # handed out but never run before the kill: marked, not left RUNNING
        assert trial.state == TrialState.COMPLETE or (
            trial.state == TrialState.FAIL and "normlab.lost" in trial.user_attrs
        ), trial
    for trial in complete:  # with what its trial reported at its last epoch
        assert trial.values == pytest.approx(
            [runs["legacy_optuna"][trial.user_attrs[RAY_TRIAL_ATTR]].data.metrics["adv_acc"]]
        )
