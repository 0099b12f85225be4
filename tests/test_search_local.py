"""A real search on a local Ray, tracked in a local MLflow store; then status and report."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import ray
import torch
from click.testing import CliRunner
from conftest import markdown_table, run_normlab
from mlflow.tracking import MlflowClient

from orchestrator.cli import main
from trainables.config import TrialConfig
from trainables.environment import environment_tags

SPACE = """
name: smoke
fixed:
  dataset: digits
  model: cnn
  epochs: 2
  train_subset: 256
  batch_size: 64
  eval_attacks: [fgsm, pgd]
  eval_eps: [0.1]
  eval_steps: 2
  epoch_adv_samples: 64
  final_adv_samples: 64
grid:
  norm: [batchnorm, robustnorm]
  lr: [0.05, 1.0e+12]        # the second diverges: NaN loss at epoch 1
search: {algorithm: grid, metric: adv_acc, mode: max}
resources: {cpu: 1}
max_failures: 1
checkpoint: {every: 1, keep: 1}
"""


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("search")
    (workdir / "smoke.yaml").write_text(textwrap.dedent(SPACE))
    proc = run_normlab("submit", "smoke.yaml", "--num-cpus", "2", cwd=workdir)
    client = MlflowClient(tracking_uri=f"sqlite:///{workdir / 'normlab_runs' / 'mlflow.db'}")
    return workdir, proc, client


def runs(client):
    experiment = client.get_experiment_by_name("smoke")
    assert experiment is not None
    all_runs = client.search_runs([experiment.experiment_id], max_results=100)
    parents = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in all_runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_submit_ends_with_a_table_and_reports_failures(search):
    _, proc, _ = search
    assert proc.returncode == 1, proc.stderr[-3000:]  # two trials diverge on purpose
    table = proc.stdout
    assert "search smoke-" in table and table.count("batchnorm") >= 2 and table.count("robustnorm") >= 2
    assert "final_clean_acc" in table and "final_adv_acc" in table and "ERROR" in table
    assert "2 trial(s) failed" in proc.stderr and "non-finite training loss" in proc.stderr
    assert "normlab resume" in proc.stderr


def test_mlflow_holds_one_parent_and_one_child_per_trial(search):
    _, _, client = search
    parents, children = runs(client)
    assert len(parents) == 1 and len(children) == 4  # a retried trial re-attaches: still one run per trial
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["normlab.ray_address"].startswith("local")
    assert parent.data.tags["mlflow.source.git.commit"]
    # the install the search ran with, on the driver and on each trial's node (test_environment.py)
    env = environment_tags()
    assert env["normlab.env.torch"] == torch.__version__.split("+")[0] and env["normlab.env.ray"] == ray.__version__
    assert {k: parent.data.tags.get(k) for k in env} == env
    assert parent.data.params["algorithm"] == "grid" and parent.data.params["trials"] == "4"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"search_space.resolved.json", "smoke.yaml"} <= artifacts
    trial_ids = {c.data.tags["normlab.trial_id"] for c in children}
    assert len(trial_ids) == 4
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        expected = set(TrialConfig.model_fields) - {"device", "threads"}
        assert set(child.data.params) == expected
        assert child.data.tags["normlab.threads"] == "1" and child.data.tags["normlab.device"] == "cpu"
        assert {k: child.data.tags.get(k) for k in env} == env


def test_runs_are_named_by_what_varies_and_the_parent_summarises_the_search(search, tmp_path):
    _, proc, client = search
    parents, children = runs(client)
    names = {c.info.run_name for c in children}
    assert names == {
        "batchnorm standard lr=0.05",
        "robustnorm standard lr=0.05",
        "batchnorm standard lr=1e12",
        "robustnorm standard lr=1e12",
    }
    assert all(c.data.tags["normlab.trial_name"].startswith("train_") for c in children)  # Ray's name, kept as a tag
    parent = parents[0]
    metrics, tags = parent.data.metrics, parent.data.tags
    assert (metrics["trials_total"], metrics["trials_finished"], metrics["trials_failed"]) == (4, 2, 2)
    best = next(c for c in children if c.info.run_id == tags["normlab.best_run_id"])
    assert best.data.params["lr"] == "0.05" and tags["normlab.best_run_name"] == best.info.run_name
    assert tags["normlab.best_by"] == "final_adv_acc (max)"
    assert metrics["best_final_adv_acc"] == max(c.data.metrics.get("final_adv_acc", -1) for c in children)
    assert metrics["best_final_clean_acc"] == best.data.metrics["final_clean_acc"]
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "summary")}
    assert artifacts == {"summary/trials.md", "summary/trials.csv"}
    table = Path(client.download_artifacts(parent.info.run_id, "summary/trials.csv", str(tmp_path))).read_text()
    assert {"norm", "lr"} <= set(table.splitlines()[0].split(","))  # the keys that vary, as columns
    experiment = parent.info.experiment_id
    url = (
        f"http://127.0.0.1:5000/normlab/open?expand={parent.info.run_id}#/experiments/{experiment}/runs?"
        f"workflowType=machine_learning&searchFilter=tags.%60normlab.search_run%60%20%3D%20%27{parent.info.run_name}%27"
    )
    assert proc.stderr.count(f"MLflow UI: {url}") == 2  # when the search starts, and at its end
    assert f"best trial: {best.info.run_name} (" in proc.stderr


def test_finished_trials_have_curves_final_metrics_and_artifacts(search):
    workdir, _, client = search
    _, children = runs(client)
    good = [c for c in children if c.data.params["lr"] == "0.05"]
    assert len(good) == 2 and all(c.info.status == "FINISHED" for c in good)
    for child in good:
        run_id = child.info.run_id
        for metric in ("train_loss", "train_acc", "clean_acc", "adv_acc"):
            history = client.get_metric_history(run_id, metric)
            assert sorted(m.step for m in history) == [1, 2], metric
        metrics = child.data.metrics
        for key in (
            "final_clean_acc",
            "final_adv_acc",
            "adv_acc_fgsm_eps0.1",
            "adv_acc_pgd_eps0.1",
            "final_clean_acc_batchstats",
            "adv_acc_pgd_eps0.1_batchstats",
        ):
            assert 0.0 <= metrics[key] <= 1.0, key
        if child.data.params["norm"] == "batchnorm":
            assert metrics["final_clean_acc"] > 0.3  # it really trained
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"result.json", "robust_accuracy_vs_eps.png", "checkpoint"} <= artifacts
        local = Path(client.download_artifacts(run_id, "checkpoint/checkpoint.pt", str(workdir / run_id)))
        state = torch.load(local, weights_only=True)
        assert state["mlflow_run_id"] == run_id and state["epoch"] == 2
        result = json.loads(Path(client.download_artifacts(run_id, "result.json", str(workdir / run_id))).read_text())
        assert result["final"]["final_adv_acc"] == pytest.approx(metrics["final_adv_acc"])


def test_ray_checkpoints_carry_the_child_run_id(search):
    workdir, _, client = search
    _, children = runs(client)
    by_trial = {c.data.tags["normlab.trial_id"]: c.info.run_id for c in children}
    ckpts = sorted((workdir / "normlab_runs" / "ray_results").glob("smoke-*/train_*/checkpoint_*/checkpoint.pt"))
    assert len(ckpts) == 2  # keep: 1, for each of the two finished trials
    for ckpt in ckpts:
        state = torch.load(ckpt, weights_only=True)
        trial_id = next(t for t in by_trial if t in ckpt.parent.parent.name)
        assert state["mlflow_run_id"] == by_trial[trial_id]


def test_failed_trials_say_why_in_mlflow(search):
    _, _, client = search
    _, children = runs(client)
    bad = [c for c in children if c.data.params["lr"] != "0.05"]
    assert len(bad) == 2
    for child in bad:
        assert child.info.status == "FAILED"
        assert "non-finite training loss" in child.data.tags["normlab.error"]
        assert "at epoch 1, step" in child.data.tags["normlab.error"]
        # a NaN loss comes back on every retry: failed once, not restarted (max_failures: 1 notwithstanding)
        assert child.data.tags["normlab.retryable"] == "false"
        assert "normlab.resumed" not in child.data.tags


def test_ray_results_carry_each_trials_resolved_knobs(search):
    """Tune's own tables (ResultGrid.get_dataframe, ExperimentAnalysis) show the keys that vary, resolved."""
    from ray.tune import ExperimentAnalysis

    workdir, _, _ = search
    folder = next((workdir / "normlab_runs" / "ray_results").glob("smoke-*"))
    frame = ExperimentAnalysis(str(folder)).dataframe()
    finished = frame[frame["knobs/lr"] == 0.05]
    assert sorted(finished["knobs/norm"]) == ["batchnorm", "robustnorm"]


def test_status_lists_trials_from_the_storage_path(search):
    workdir, _, _ = search
    proc = run_normlab("status", "smoke", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("TERMINATED") == 2 and proc.stdout.count("ERROR") == 2
    assert "smoke-" in proc.stdout
    assert proc.stdout.count("NonFiniteLossError: non-finite training loss") == 2  # why, in the status table


def report(*args: str, workdir: Path) -> tuple[int, str, str]:
    """`normlab report ...` in this process (a subprocess would import torch again)."""
    result = CliRunner().invoke(
        main, ["report", *args, "--tracking-uri", f"sqlite:///{workdir / 'normlab_runs' / 'mlflow.db'}"]
    )
    return result.exit_code, result.stdout, result.stderr


def test_report_formats_and_plot(search):
    workdir, _, _ = search
    table = run_normlab("report", "smoke", cwd=workdir)  # the real command, default store in the working directory
    assert table.returncode == 0, table.stderr
    assert "robustnorm" in table.stdout and "FAILED" in table.stdout
    code, csv, _ = report("smoke", "--format", "csv", workdir=workdir)
    header, *lines = csv.strip().splitlines()
    assert (
        code == 0 and header.startswith("trial,status,norm,regime,lr,final_clean_acc,final_adv_acc") and len(lines) == 4
    )
    records = json.loads(report("smoke", "--format", "json", workdir=workdir)[1])
    assert {r["norm"] for r in records} == {"batchnorm", "robustnorm"}
    finished = [r for r in records if r["status"] == "FINISHED"]
    assert len(finished) == 2 and all(0 <= r["final_adv_acc"] <= 1 for r in finished)
    md = report("smoke", "--format", "markdown", workdir=workdir)[1]
    header, aligns, rows = markdown_table(md)
    assert header[:3] == ["trial", "status", "norm"] and len(rows) == 4
    assert aligns[header.index("final_adv_acc")] == "right" and aligns[header.index("norm")] == "left"
    finished = [r for r in rows if r[1] == "FINISHED"]
    assert len(finished) == 2 and all(len(r[header.index("final_adv_acc")].split(".")[1]) == 4 for r in finished)
    plot = workdir / "plots" / "tradeoff.png"
    code, _, _ = report("smoke", "--plot", str(plot), workdir=workdir)
    assert code == 0 and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    code, _, err = report("nosuch", workdir=workdir)
    assert code == 2 and "no search named 'nosuch'" in err and "smoke" in err


def test_a_search_whose_experiment_was_deleted_in_mlflow_is_one_clear_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    client.delete_experiment(client.create_experiment("binned"))
    (tmp_path / "binned.yaml").write_text("name: binned\nfixed: {dataset: digits, epochs: 1}\n")
    proc = run_normlab("submit", "binned.yaml", "--tracking-uri", uri, "--num-cpus", "1", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "experiment 'binned' was deleted in MLflow" in proc.stderr and "mlflow gc" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_two_searches_started_in_the_same_second_get_their_own_folders(tmp_path):
    from orchestrator.running.driver import _new_experiment_name
    from orchestrator.state import storage

    root = storage.resolve(str(tmp_path / "runs"))
    names = [_new_experiment_name(root, "twice") for _ in range(3)]
    assert len(set(names)) == 3 and all((tmp_path / "runs" / n).is_dir() for n in names)
    assert all(n.startswith("twice-") for n in names)
