"""Remote storage: the search record written atomically and read back clearly, and whole
searches stored on a real S3 server (SeaweedFS on 127.0.0.1): submit, kill, resume, status."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import normlab_env, run_normlab
from mlflow.tracking import MlflowClient
from s3server import ACCESS_KEY, S3_ENV, SECRET_KEY, S3Server

from orchestrator.cli import main
from orchestrator.state import storage
from orchestrator.state.records import RECORD_FILE, SearchRecord
from orchestrator.tracking.target import TrackingTarget
from orchestrator.tracking.trial_runs import MlflowTrialTracker

# ------------------------------------------------------------------ without a server

RECORD = {
    "space": {"name": "tiny"},
    "space_file": "tiny.yaml",
    "tracking_uri": "sqlite:///mlflow.db",
    "artifact_root": None,
    "tracker": {
        "tracking_uri": "sqlite:///mlflow.db",
        "experiment_id": "1",
        "parent_run_id": "abc",
        "search_name": "tiny-1",
    },
}


def test_local_write_is_atomic_and_leaves_no_temporary_files(tmp_path):
    target = storage.resolve(str(tmp_path)).child("sub").child("record.json")
    storage.write_atomic(target, b"first")
    storage.write_atomic(target, b"second, longer")
    assert storage.read_bytes(target) == b"second, longer"
    with pytest.raises(TypeError):  # a write that fails half-way keeps the old file whole
        storage.write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert (tmp_path / "sub" / "record.json").read_bytes() == b"second, longer"
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["record.json"]
    assert (tmp_path / "sub" / "record.json").stat().st_mode & 0o777 == 0o644


def test_uris_keep_their_options_and_refuse_credentials(tmp_path):
    root = storage.resolve("s3://bucket/pre?endpoint_override=127.0.0.1:9&scheme=http")
    folder = root.child("search-20250101-000000")
    assert folder.uri == "s3://bucket/pre/search-20250101-000000?endpoint_override=127.0.0.1:9&scheme=http"
    assert (folder.path, folder.name, folder.is_local) == (
        "bucket/pre/search-20250101-000000",
        "search-20250101-000000",
        False,
    )
    with pytest.raises(storage.StorageError, match="carries credentials") as info:
        storage.resolve("s3://AKIA:topsecret@bucket/pre?endpoint_override=127.0.0.1:9&scheme=http")
    assert "topsecret" not in str(info.value)
    with pytest.raises(storage.StorageError, match="cannot use storage path nosuch://x"):
        storage.resolve("nosuch://x")
    assert storage.resolve(None, tmp_path).uri == str(tmp_path.resolve() / "normlab_runs" / "ray_results")


def resume(*args: str) -> tuple[int, str]:
    """`normlab resume ...` in this process (it fails before Ray starts): exit code, stderr."""
    result = CliRunner().invoke(main, ["resume", *args])
    return result.exit_code, result.stderr


def fake_search(root: Path, record: str | None) -> Path:
    """A folder as Ray Tune leaves it (an experiment snapshot), with ``record`` as normlab's record."""
    folder = root / "tiny-20250101-000000"
    folder.mkdir(parents=True)
    (folder / "experiment_state-2025-01-01_00-00-00.json").write_text("{}")
    if record is not None:
        (folder / RECORD_FILE).parent.mkdir(parents=True, exist_ok=True)
        (folder / RECORD_FILE).write_text(record)
    return folder


@pytest.mark.parametrize(
    ("record", "expected"),
    [
        (None, "is missing"),
        (json.dumps(RECORD, indent=2)[:70], "is not valid JSON; it may have been cut short by a crash"),
        ("", "is not valid JSON"),
        ("<html>oops</html>", "is not valid JSON"),
        (json.dumps({"space": {}}), "is not a normlab search record (space_file: Field required"),
        (
            json.dumps({**RECORD, "space": {"name": "tiny", "nonsense": 1}}),
            "holds a search space this normlab cannot run",
        ),
    ],
)
def test_a_bad_record_is_one_clear_error(tmp_path, record, expected):
    folder = fake_search(tmp_path / "runs", record)
    for args in ([str(folder)], ["tiny", "--storage-path", str(tmp_path / "runs")]):
        code, err = resume(*args)
        assert code == 2, err
        assert f"error: {folder / RECORD_FILE} " in err, err  # where
        assert expected in err and "submit the search again" in err, err  # what is wrong, what to do


def test_a_record_round_trips_in_the_format_it_always_had(tmp_path):
    record = SearchRecord.from_json(json.dumps(RECORD))  # as written by earlier normlab versions
    assert json.loads(record.to_json()) == RECORD


def test_a_record_holds_its_tracking_target_once_and_old_records_give_the_same_target():
    uri, root = "sqlite:////runs/mlflow.db", "file:///runs/mlartifacts"
    written = {
        **RECORD,
        "tracking_uri": uri,
        "artifact_root": root,
        "tracker": {**RECORD["tracker"], "tracking_uri": uri},
    }
    old = SearchRecord.from_json(json.dumps(written))
    assert old.target == TrackingTarget(uri, root)  # an earlier version's record: both at the top level
    tracker = MlflowTrialTracker.for_target(old.target, "1", "abc", "tiny-1")
    new = SearchRecord(old.space, old.space_file, tracker)
    assert new.target == tracker.target == old.target
    text = new.to_json()
    assert text.count(uri) == 1 and text.count(root) == 1, text  # once: in the tracker
    assert not {"tracking_uri", "artifact_root"} & set(json.loads(text))
    assert SearchRecord.from_json(text).target == old.target
    assert SearchRecord.from_json(text) == new


def test_a_tracker_pickled_before_it_held_the_artifact_folder_still_loads():
    tracker = MlflowTrialTracker.for_target(TrackingTarget("sqlite:///mlflow.db", "file:///a"), "1", "abc", "tiny-1")
    earlier = object.__new__(MlflowTrialTracker)  # as Ray pickled an earlier version's tracker: no artifact_root
    earlier.__dict__.update({k: v for k, v in vars(tracker).items() if k != "artifact_root"})
    data = pickle.dumps(earlier)
    assert b"artifact_root" not in data and b"tracking_uri" in data
    loaded = pickle.loads(data)
    assert loaded.target == TrackingTarget("sqlite:///mlflow.db")  # its record holds the artifact folder
    assert loaded == dataclasses.replace(tracker, artifact_root=None)
    assert pickle.loads(pickle.dumps(tracker)).target == tracker.target


# ------------------------------------------------------------------ a real S3 server

# SeaweedFS on 127.0.0.1 (tests/s3server.py), one server per module: the `s3` fixture of conftest.py

SMALL = """
name: {name}
fixed: {{dataset: digits, model: cnn, epochs: {epochs}, train_subset: {subset}, batch_size: 64, regime: {regime},
        train_steps: 2, eval_attacks: [fgsm], eval_eps: [0.1], epoch_adv_samples: 64, final_adv_samples: 64}}
grid: {{norm: [batchnorm, robustnorm]}}
resources: {{cpu: 1}}
max_failures: 0
checkpoint: {{every: 1, keep: {keep}}}
"""


def space_file(
    workdir: Path, name: str, epochs: int, subset: int | str, regime: str = "standard", keep: int = 1
) -> str:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / f"{name}.yaml").write_text(
        textwrap.dedent(SMALL.format(name=name, epochs=epochs, subset=subset, regime=regime, keep=keep))
    )
    return f"{name}.yaml"


def child_runs(workdir: Path, name: str) -> tuple[list, list, MlflowClient]:
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'normlab_runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags], client


@pytest.fixture(scope="module")
def submitted(s3, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("submit")
    space = space_file(workdir, "s3tiny", epochs=2, subset=256)
    started = time.time()
    proc = run_normlab("submit", space, "--num-cpus", "2", "--storage-path", s3.uri("runs"), cwd=workdir, **S3_ENV)
    return workdir, proc, time.time() - started


@pytest.mark.slow
def test_submit_keeps_checkpoints_state_and_record_in_the_bucket(s3, submitted):
    workdir, proc, _ = submitted
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count(" OK ") == 2 and "search s3tiny-" in proc.stdout
    files = s3.files("runs")
    folders = {path.split("/")[0] for path in files}
    assert len(folders) == 1 and folders.pop().startswith("s3tiny-")
    records = [p for p in files if p.endswith("/" + RECORD_FILE)]
    assert len(records) == 1
    with s3.fs().open_input_stream(f"{s3.bucket}/runs/{records[0]}") as fh:
        record = SearchRecord.from_json(fh.read())
    assert record.space["name"] == "s3tiny" and record.tracker.search_name == "s3tiny"
    assert any("/experiment_state-" in p for p in files)
    checkpoints = [p for p in files if p.endswith("/checkpoint.pt")]
    assert len(checkpoints) == 2 and all(files[p] > 1000 for p in checkpoints)  # keep: 1, per trial
    assert not (workdir / "normlab_runs" / "ray_results").exists()  # nothing went to the local default
    _, children, _ = child_runs(workdir, "s3tiny")
    assert len(children) == 2 and all(c.info.status == "FINISHED" for c in children)


@pytest.mark.slow
def test_the_record_went_up_in_one_request(s3, submitted):
    key = next(p for p in s3.files("runs") if p.endswith("/" + RECORD_FILE))
    log = s3.log.read_text()
    assert f"PutObjectHandler bucket={s3.bucket} object=runs/{key} " in log  # SeaweedFS 4.48's words
    assert f"<Key>runs/{key}</Key><UploadId>" not in log  # no multipart upload of it


@pytest.mark.slow
def test_no_object_in_the_bucket_holds_the_credentials(s3, submitted):
    fs = s3.fs()
    for path in s3.files("runs"):
        with fs.open_input_stream(f"{s3.bucket}/runs/{path}") as fh:
            content = fh.read()
        assert SECRET_KEY.encode() not in content and ACCESS_KEY.encode() not in content, path


@pytest.mark.slow
def test_status_lists_the_trials_in_the_bucket(s3, submitted):
    workdir, _, _ = submitted
    proc = run_normlab("status", "s3tiny", "--storage-path", s3.uri("runs"), cwd=workdir, **S3_ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("TERMINATED") == 2 and "s3tiny-" in proc.stdout
    empty = run_normlab("status", "--storage-path", s3.uri("nothing-here"), cwd=workdir, **S3_ENV)
    assert empty.returncode == 0 and "no searches in s3://" in empty.stdout


@pytest.mark.slow
def test_a_bad_record_in_the_bucket_is_one_clear_error(s3, tmp_path):
    fs = s3.fs()
    folder = f"{s3.bucket}/broken/tiny-20250101-000000"
    with fs.open_output_stream(f"{folder}/experiment_state-2025-01-01_00-00-00.json") as fh:
        fh.write(b"{}")
    uri = s3.uri("broken/tiny-20250101-000000")
    by_uri = run_normlab("resume", uri, cwd=tmp_path, **S3_ENV)
    assert by_uri.returncode == 2 and "is missing" in by_uri.stderr and "Traceback" not in by_uri.stderr
    with fs.open_output_stream(f"{folder}/{RECORD_FILE}") as fh:
        fh.write(json.dumps(RECORD).encode()[:40])
    by_name = run_normlab("resume", "tiny", "--storage-path", s3.uri("broken"), cwd=tmp_path, **S3_ENV)
    err = " ".join(by_name.stderr.split())
    assert by_name.returncode == 2 and "Traceback" not in err, err
    assert "not valid JSON; it may have been cut short" in err and "submit the search again" in err
    assert storage.join(s3.uri("broken/tiny-20250101-000000"), RECORD_FILE).split("?")[0] in err.replace(" ", "")
    wrong_keys = run_normlab(
        "resume",
        uri,
        cwd=tmp_path,
        AWS_ACCESS_KEY_ID="nobody",
        AWS_SECRET_ACCESS_KEY="wrong",
        AWS_EC2_METADATA_DISABLED="true",
    )
    assert wrong_keys.returncode == 2 and "Traceback" not in wrong_keys.stderr, wrong_keys.stderr[-2000:]


@pytest.mark.slow
def test_a_missing_bucket_or_unknown_keys_stop_submit_before_ray_starts(s3, tmp_path):
    space = space_file(tmp_path, "nobucket", epochs=1, subset=128)
    uri = f"s3://no-such-bucket/runs?endpoint_override={s3.endpoint}&scheme=http"
    proc = run_normlab("submit", space, "--storage-path", uri, cwd=tmp_path, **S3_ENV)
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 2 and "bucket 'no-such-bucket' of s3://no-such-bucket/runs?" in err, err
    assert "create it first" in err and "Traceback" not in err and "trial(s) on Ray" not in err  # Ray never started
    wrong = run_normlab(
        "submit", space, "--storage-path", s3.uri("runs"), cwd=tmp_path, **{**S3_ENV, "AWS_SECRET_ACCESS_KEY": "wrong"}
    )
    assert wrong.returncode == 2 and "cannot reach s3://" in wrong.stderr and "Traceback" not in wrong.stderr, (
        wrong.stderr
    )


def s3_checkpoints(s3: S3Server, prefix: str) -> dict[str, set[str]]:
    trials: dict[str, set[str]] = {}
    for path in s3.files(prefix):
        parts = path.split("/")
        if len(parts) == 4 and parts[3] == "checkpoint.pt":
            trials.setdefault(parts[1], set()).add(parts[2])
    return trials


@pytest.mark.slow
def test_a_killed_search_resumes_from_the_bucket_into_the_same_runs(s3, tmp_path, monkeypatch):
    from ray.tune import ExperimentAnalysis

    epochs = 10  # long enough that the kill lands mid-run on an idle machine too
    space = space_file(tmp_path, "s3kill", epochs=epochs, subset="null", regime="pgd_at", keep=2)
    log = tmp_path / "submit.log"
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "submit",
            space,
            "--num-cpus",
            "2",
            "--storage-path",
            s3.uri("kill"),
        ],
        cwd=tmp_path,
        env=normlab_env(**S3_ENV),
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        start_new_session=True,
    )
    deadline = time.time() + 300
    try:
        while time.time() < deadline and driver.poll() is None:
            found = s3_checkpoints(s3, "kill")
            if len(found) == 2 and all(len(c) >= 2 for c in found.values()):
                break
            time.sleep(0.5)
        assert driver.poll() is None, "the search ended before it could be killed:\n" + log.read_text()[-3000:]
        time.sleep(2.5)  # let Tune snapshot its state (TUNE_GLOBAL_CHECKPOINT_S=2), as a long run would have
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started: nothing shuts down cleanly
        last = f"checkpoint_{epochs - 1:06d}"  # Ray counts checkpoints from 0
        assert not any(last in c for c in s3_checkpoints(s3, "kill").values()), "a trial finished before the kill"
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    time.sleep(3)  # Ray's reaper ends the orphaned workers

    resumed = run_normlab(
        "resume", "s3kill", "--num-cpus", "2", "--storage-path", s3.uri("kill"), cwd=tmp_path, **S3_ENV
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming search s3kill-" in resumed.stderr and resumed.stdout.count(" OK ") == 2

    parents, children, client = child_runs(tmp_path, "s3kill")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED" and "normlab.resumed_at" in parents[0].data.tags
    assert len(children) == 2  # the same runs, re-attached through the run id in each checkpoint
    for child in children:
        assert child.info.status == "FINISHED", child.data.tags
        assert child.data.tags["normlab.resumed"] == "true"
        steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, "train_loss"))
        assert steps == list(range(1, epochs + 1)), steps  # every epoch exactly once: none lost, none repeated
        assert "final_adv_acc" in child.data.metrics
    for key, value in S3_ENV.items():
        monkeypatch.setenv(key, value)
    folder = s3.uri(f"kill/{resumed.stderr.split('resuming search ')[1].split()[0]}")
    trials = ExperimentAnalysis(folder).trials  # Ray's own record, in the bucket: continued, not started over
    assert len(trials) == 2 and all(t.status == "TERMINATED" for t in trials)
    for trial in trials:
        # fewer than all epochs reported by the resumed trial (or none: it found its last checkpoint)
        assert trial.last_result["iterations_since_restore"] < epochs, trial.last_result
    assert not (tmp_path / "normlab_runs" / "ray_results").exists()
    status = run_normlab("status", "--storage-path", s3.uri("kill"), cwd=tmp_path, **S3_ENV)
    assert status.returncode == 0 and status.stdout.count("TERMINATED") == 2, status.stdout + status.stderr[-2000:]
