"""A real database for the shared stores: an MLflow server whose backend store is PostgreSQL,
and the Optuna study on the same PostgreSQL, for a search whose trials run on two Ray nodes
at once (``ray.cluster_utils.Cluster`` on 127.0.0.1, as in test_multinode.py).

The server is started by the test (``pgserver.PostgresServer``: 127.0.0.1, a free port, a
fresh folder, as the ``postgres`` user when we are root) and takes passwords on TCP. Neither
URL holds the password: the study's is ``postgresql://USER@127.0.0.1:PORT/optuna`` and libpq
reads the password from ``PGPASSWORD`` in the driver's environment; the MLflow server reads
it the same way from its own. The test then checks that every epoch's metrics are in the
database once per trial, that the study's trials are COMPLETE once each, and that the
password is nowhere: not in the command's output, not in any file of the search's storage
folder, the MLflow artifacts or Ray's session folder, not in any MLflow param or tag.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest
from conftest import MlflowServer, normlab_env, run_normlab
from mlflow.tracking import MlflowClient

from orchestrator.credentials.uris import mask_uri, url_password
from orchestrator.searchfile.load import load_space
from orchestrator.searchfile.space import SpaceError, sqlalchemy_url

PASSWORD = "pg-9d41c6e2-never-stored"  # a string found nowhere else
ROLE = "normlab"
EPOCHS = 2
TRIALS = 4
EPOCH_METRICS = ("epoch", "train_loss", "train_acc", "clean_acc", "adv_acc")

SPACE = f"""
name: pgsearch
fixed: {{{{dataset: digits, model: cnn, epochs: {EPOCHS}, train_subset: 256, batch_size: 64, test_subset: 96,
        eval_attacks: [fgsm], eval_eps: [0.1], epoch_adv_samples: 32, final_adv_samples: 32, device: cpu}}}}
grid: {{{{norm: [robustnorm]}}}}
sample:
  lr: {{{{loguniform: [0.01, 0.2]}}}}
  norm_power: {{{{uniform: [0.1, 1.0]}}}}
search: {{{{algorithm: optuna, num_samples: {TRIALS}, metric: clean_acc, mode: max, scheduler: fifo, max_concurrent_trials: 2,
          storage: '{{storage}}'}}}}
resources: {{{{cpu: 1}}}}
"""


def write_space(folder: Path, storage: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "space.yaml"
    path.write_text(textwrap.dedent(SPACE.format(storage=storage)))
    return path


# ------------------------------------------------------------------ the study URL, no server


def test_a_postgres_study_url_without_a_password_is_accepted_and_one_with_a_password_refused(tmp_path):
    plain = "postgresql://normlab@db.internal:5432/optuna"
    assert load_space(str(write_space(tmp_path, plain)))[0].search.storage == plain  # kept as written
    assert sqlalchemy_url(plain) in (plain, plain.replace("postgresql://", "postgresql+psycopg2://"))
    assert url_password(plain) is None and url_password("sqlite:////tmp/optuna.db") is None
    for url, where in (
        (f"postgresql://normlab:{PASSWORD}@db.internal:5432/optuna", "its user:password@ part"),
        (f"postgresql://normlab@db.internal:5432/optuna?sslmode=require&password={PASSWORD}", "its password= query"),
        (f"postgresql+psycopg2://normlab:{PASSWORD}@db.internal/optuna", "its user:password@ part"),
    ):
        assert url_password(url).startswith(where), url
        with pytest.raises(SpaceError) as info:
            load_space(str(write_space(tmp_path, url)))
        message = " ".join(str(info.value).split())
        assert f"search.storage: the study storage URL carries a password ({where}" in message, message
        assert "PGPASSWORD" in message and "PGPASSFILE" in message and "postgresql://USER@HOST:PORT/DATABASE" in message
        assert PASSWORD not in message
        assert PASSWORD not in mask_uri(url)
    # the same refusal from the command line, before anything starts
    proc = run_normlab("validate", "space.yaml", cwd=tmp_path)
    assert proc.returncode == 2 and "search.storage" in proc.stderr and PASSWORD not in proc.stdout + proc.stderr


def test_a_study_database_that_cannot_be_opened_is_one_clear_error():
    from conftest import free_port

    from orchestrator.studies.study import StudyStorageError, rdb_storage

    with pytest.raises(StudyStorageError) as info:  # nothing listens there
        rdb_storage(f"postgresql://normlab@127.0.0.1:{free_port()}/optuna")
    message = str(info.value)
    assert message.startswith("cannot open the Optuna study's database (search.storage): connection to server at")
    assert "PGPASSWORD" in message and "\n" not in message


# ------------------------------------------------------------------ a real server, two Ray nodes


@pytest.fixture
def postgres():
    from pgserver import PostgresServer

    try:
        server = PostgresServer()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    server.start()
    try:
        server.create(ROLE, PASSWORD, "mlflow", "optuna")
        yield server
    finally:
        server.stop()


@pytest.fixture
def two_nodes():
    """Two Ray nodes of one CPU each: two trials at once, one on each."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def files_holding(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and not p.is_symlink() and secret.encode() in p.read_bytes()]


@pytest.mark.slow
def test_mlflow_and_optuna_on_postgres_for_a_search_on_two_nodes(tmp_path, postgres, two_nodes, monkeypatch):
    import optuna
    import psycopg2
    from optuna.trial import TrialState

    db_env = {"PGPASSWORD": PASSWORD}
    server = MlflowServer(
        tmp_path,
        env=normlab_env(**db_env),
        backend=sqlalchemy_url(postgres.url(ROLE, "mlflow")),  # MLflow opens it with SQLAlchemy too
    ).start()
    study_url = postgres.url(ROLE, "optuna")
    write_space(tmp_path, study_url)
    started = time.time()
    try:
        proc = run_normlab(
            "submit",
            "space.yaml",
            "--address",
            two_nodes.address,
            "--tracking-uri",
            server.uri,
            "--storage-path",
            str(tmp_path / "shared"),
            cwd=tmp_path,
            timeout=600,
            **db_env,
        )
        took = time.time() - started
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert f"in {study_url}" in proc.stderr  # the study's URL as written: no password in it

        # --- MLflow: every epoch's metrics once per trial
        client = MlflowClient(tracking_uri=server.uri)
        experiment = client.get_experiment_by_name("pgsearch")
        runs = client.search_runs([experiment.experiment_id])
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(runs) == TRIALS + 1 and len(children) == TRIALS
        nodes = {r.data.tags["normlab.node_id"] for r in children}
        assert nodes == {n.node_id for n in two_nodes.list_all_nodes()}, nodes  # trials ran on both nodes
        assert any(  # and at the same time
            a.data.tags["normlab.node_id"] != b.data.tags["normlab.node_id"]
            and a.info.start_time < b.info.end_time
            and b.info.start_time < a.info.end_time
            for a in children
            for b in children
        ), sorted((r.info.start_time, r.info.end_time, r.data.tags["normlab.node_id"][:6]) for r in children)
        for child in children:
            assert child.info.status == "FINISHED", child.data.tags
            for metric in EPOCH_METRICS:
                steps = sorted(m.step for m in client.get_metric_history(child.info.run_id, metric))
                assert steps == list(range(1, EPOCHS + 1)), (metric, steps)
            assert "final_adv_acc" in child.data.metrics
        for run in runs:
            fields = {**run.data.params, **run.data.tags}
            assert not [k for k, v in fields.items() if PASSWORD in v], fields
        parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
        assert parent.data.tags["normlab.study_storage"] == study_url
    finally:
        server.stop()

    # --- the same, straight from PostgreSQL: MLflow's tables there, each (run, metric, step) once
    with psycopg2.connect(postgres.url(ROLE, "mlflow"), password=PASSWORD) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM runs WHERE experiment_id = %s", (int(experiment.experiment_id),))
        assert cur.fetchone()[0] == TRIALS + 1
        cur.execute(
            "SELECT key, count(*) FROM metrics WHERE run_uuid = ANY(%s) AND key = ANY(%s) GROUP BY key",
            ([c.info.run_id for c in children], list(EPOCH_METRICS)),
        )
        assert dict(cur.fetchall()) == dict.fromkeys(EPOCH_METRICS, TRIALS * EPOCHS)

    # --- the study, on PostgreSQL: every trial COMPLETE once, one per Ray trial
    monkeypatch.setenv("PGPASSWORD", PASSWORD)  # as normlab's driver had it: never in the URL
    (name,) = optuna.get_all_study_names(sqlalchemy_url(study_url))
    study = optuna.load_study(study_name=name, storage=sqlalchemy_url(study_url))
    assert name == parent.data.tags["normlab.study"]
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * TRIALS
    ray_ids = sorted(t.user_attrs["ray_trial_id"] for t in study.trials)
    assert ray_ids == sorted(c.data.tags["normlab.trial_id"] for c in children)  # once each
    by_ray = {c.data.tags["normlab.trial_id"]: c for c in children}
    for trial in study.trials:  # the study's value is the run's last clean_acc
        assert trial.value == pytest.approx(by_ray[trial.user_attrs["ray_trial_id"]].data.metrics["clean_acc"])

    # --- the password: not printed, not stored, not in Ray's state
    assert PASSWORD not in proc.stdout + proc.stderr
    session = Path(two_nodes.head_node.get_session_dir_path())
    # tmp_path holds the storage folder (shared/: checkpoints, Ray Tune's state, normlab's record),
    # the MLflow artifacts (server-artifacts/) and the servers' logs
    leaked = files_holding(tmp_path, PASSWORD) + files_holding(session, PASSWORD)
    assert leaked == [], f"the database password was written to {leaked}"
    assert list((tmp_path / "shared").glob("pgsearch-*/normlab/search.json"))  # the record was there to search
    print(f"search on two nodes with MLflow and Optuna on PostgreSQL: {took:.0f} s")
