"""The search's summary on its parent run: best trial, its final metrics, counts, a table of trials."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from conftest import free_port, markdown_table
from mlflow.tracking import MlflowClient

from orchestrator.tracking.search_run import start_search_run
from orchestrator.tracking.summary import REPORT_FILES, TrialRun, describe, log_search_summary, summarise
from orchestrator.tracking.target import resolve_tracking
from orchestrator.tracking.trial_runs import MlflowTrialTracker
from trainables.record import TrialRecord


def _history(adv: list[float], final: dict[str, float] | None = None) -> list[dict[str, float]]:
    rows = [{"epoch": e + 1, "train_loss": 1.0 / (e + 1), "clean_acc": 0.9, "adv_acc": a} for e, a in enumerate(adv)]
    rows[-1].update(final or {})
    return rows


def _final(clean: float, adv: float) -> dict[str, float]:
    return {"final_clean_acc": clean, "final_adv_acc": adv, "adv_acc_pgd_eps0.1": adv, "adv_acc_fgsm_eps0.1": adv + 0.1}


@pytest.fixture
def search(tmp_path):
    """A search with four trials in a real local store: two finished, one failed, one stopped early."""
    target = resolve_tracking(None, tmp_path)
    spec = tmp_path / "s.yaml"
    spec.write_text("name: summ\n")
    tracker = start_search_run(
        target, "summ", "summ-20250101-000000", params={}, spec={}, spec_file=spec, tags={}, name_keys=("norm_power",)
    )
    config = {"regime": "pgd_at", "norm_power": 0.2, "eval_attacks": ["pgd", "fgsm"], "eval_eps": [0.1]}
    finished = [
        TrialRecord(
            "aa000_00000",
            "train_aa000_00000",
            {**config, "norm": "batchnorm"},
            2,
            history=_history([0.2, 0.3], _final(0.95, 0.31)),
        ),
        TrialRecord(
            "aa000_00001",
            "train_aa000_00001",
            {**config, "norm": "robustnorm", "norm_power": 0.5},
            2,
            history=_history([0.4, 0.6], _final(0.90, 0.55)),
        ),  # the best by final_adv_acc
    ]
    for record in finished:
        assert tracker.sync(record, budget_s=10, finish=True)
    failed = TrialRecord("aa000_00002", "train_aa000_00002", {**config, "norm": "robustnorm", "norm_power": 1.0}, 2)
    assert tracker.fail(failed, "non-finite training loss", retryable=False, budget_s=10)
    stopped = TrialRecord(
        "aa000_00003",
        "train_aa000_00003",
        {**config, "norm": "batchnorm", "norm_power": 1.0},
        2,
        history=_history([0.9]),
    )  # a high per-epoch adv_acc, but no final sweep
    assert tracker.sync(stopped, budget_s=10)
    assert tracker.close(stopped, "KILLED", "stopped by the scheduler", budget_s=10)
    return tracker, MlflowClient(tracking_uri=target.uri), finished[1]


def test_the_parent_run_carries_the_best_trial_counts_and_a_table(search, tmp_path):
    tracker, client, best = search
    summary = log_search_summary(tracker, metric="adv_acc", mode="max", budget_s=10)
    assert summary is not None and summary.best is not None and summary.best.run_id == best.run_id
    parent = client.get_run(tracker.parent_run_id)
    metrics, tags = parent.data.metrics, parent.data.tags
    assert metrics["best_final_adv_acc"] == pytest.approx(0.55) and metrics["best_final_clean_acc"] == pytest.approx(
        0.90
    )
    assert metrics["best_adv_acc_pgd_eps0.1"] == pytest.approx(0.55)
    assert (
        metrics["trials_total"],
        metrics["trials_finished"],
        metrics["trials_failed"],
        metrics["trials_killed"],
    ) == (4, 2, 1, 1)
    best_name = client.get_run(best.run_id).info.run_name
    assert best_name == "robustnorm pgd_at p=0.5"
    assert tags["normlab.best_run_id"] == best.run_id and tags["normlab.best_run_name"] == best_name
    assert tags["normlab.best_by"] == "final_adv_acc (max)"  # the final sweep, not the stopped trial's 0.9 epoch value
    # through normlab's page, in the form any MLflow opens (orchestrator.tracking.links); the description's, relative
    route = f"#/experiments/{tracker.experiment_id}/runs/{best.run_id}?workflowType=machine_learning"
    assert tags["normlab.best_run_url"] == f"http://127.0.0.1:5000/?normlab=open{route}"
    assert f"[{best_name}](?normlab=open{route})" in tags["mlflow.note.content"]
    assert "4 trials: 2 finished, 1 failed, 1 killed" in tags["mlflow.note.content"]

    folder = Path(client.download_artifacts(tracker.parent_run_id, "summary", str(tmp_path / "dl")))
    header, aligns, rows = markdown_table((folder / "trials.md").read_text())
    assert header == ["trial", "status", "norm", "regime", "norm_power", "final_clean_acc", "final_adv_acc"]
    assert aligns == ["left"] * 5 + ["right"] * 2  # the accuracies right-aligned
    assert (
        len(rows) == 4
        and ["robustnorm pgd_at p=0.5", "FINISHED", "robustnorm", "pgd_at", "0.5", "0.9000", "0.5500"] in rows
    )
    csv = (folder / "trials.csv").read_text().splitlines()
    assert (
        csv[0].endswith(",run_id")
        and len(csv) == 5
        and any(line.startswith("robustnorm pgd_at p=1,FAILED") for line in csv)
    )


def test_a_resume_logs_the_summary_again_at_the_next_step_and_keeps_a_users_description(search):
    tracker, client, _ = search
    assert log_search_summary(tracker, metric="adv_acc", mode="max", budget_s=10) is not None
    client.set_tag(tracker.parent_run_id, "mlflow.note.content", "my own notes")
    assert log_search_summary(tracker, metric="adv_acc", mode="min", budget_s=10) is not None
    history = client.get_metric_history(tracker.parent_run_id, "trials_total")
    assert sorted(m.step for m in history) == [0, 1]
    tags = client.get_run(tracker.parent_run_id).data.tags
    assert tags["mlflow.note.content"] == "my own notes" and tags["normlab.best_by"] == "final_adv_acc (min)"


def test_without_final_metrics_the_last_value_of_the_metric_ranks():
    trials = [
        TrialRun("a", "1", "KILLED", metrics={"adv_acc": 0.4}),
        TrialRun("b", "2", "KILLED", metrics={"adv_acc": 0.7}),
        TrialRun("c", "3", "FAILED"),
    ]
    summary = summarise(trials, metric="adv_acc", mode="max")
    assert summary.best.name == "b" and summary.metrics["best_adv_acc"] == 0.7
    assert summary.tags["normlab.best_by"] == "adv_acc (max)" and set(summary.files) == set(REPORT_FILES)
    nothing = summarise([TrialRun("c", "3", "FAILED")], metric="adv_acc", mode="max")
    assert nothing.best is None and "normlab.best_run_id" not in nothing.tags and nothing.metrics["trials_failed"] == 1
    assert describe(summary) == "best trial: b (adv_acc 0.7; killed) by adv_acc (max)"


def test_a_failed_trial_is_best_only_when_no_other_trial_logged_the_metric():
    failed = TrialRun("a", "1", "FAILED", metrics={"adv_acc": 0.9})  # its last epoch before it failed
    summary = summarise([failed, TrialRun("b", "2", "KILLED", metrics={"adv_acc": 0.5})], metric="adv_acc", mode="max")
    assert summary.best.name == "b"
    alone = summarise([failed, TrialRun("c", "3", "FAILED")], metric="adv_acc", mode="max")
    assert alone.best.name == "a" and describe(alone) == "best trial: a (adv_acc 0.9; failed) by adv_acc (max)"
    assert "(adv_acc 0.9000; no final metrics; failed)" in alone.note


def test_the_trials_table_escapes_pipes_and_keeps_values_as_logged():
    trials = [
        TrialRun("a|b", "1", "FINISHED", params={"norm": "batchnorm", "lr": "0.10"}, metrics={"final_adv_acc": 0.5}),
        TrialRun("c", "2", "FAILED", params={"norm": "x|y", "lr": "1e-3"}),
    ]
    text = summarise(trials, metric="adv_acc", mode="max").files["summary/trials.md"]
    header, _, rows = markdown_table(text)
    assert header == ["trial", "status", "norm", "regime", "lr", "final_clean_acc", "final_adv_acc"]
    assert rows == [
        ["a\\|b", "FINISHED", "batchnorm", "", "0.10", "", "0.5000"],
        ["c", "FAILED", "x\\|y", "", "1e-3", "", ""],
    ]
    assert text.endswith("|\n")


def test_another_report_file_is_one_more_function():
    def norms(trials, keys):
        return ",".join(sorted({t.params["norm"] for t in trials}))

    trials = [
        TrialRun("a", "1", "FINISHED", params={"norm": "batchnorm"}),
        TrialRun("b", "2", "FINISHED", params={"norm": "x"}),
    ]
    summary = summarise(trials, metric="adv_acc", mode="max", files={**REPORT_FILES, "summary/norms.txt": norms})
    assert summary.files["summary/norms.txt"] == "batchnorm,x" and "summary/trials.md" in summary.files


def test_mlflow_down_at_the_end_warns_and_never_raises(caplog):
    tracker = MlflowTrialTracker(f"http://127.0.0.1:{free_port()}", "1", "deadbeef", "summ")  # nothing listens
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="normlab.tracking"):
        assert log_search_summary(tracker, metric="adv_acc", mode="max", budget_s=2) is None
    assert time.monotonic() - start < 20
    assert "its summary could not be logged" in caplog.text and "unreachable" in caplog.text
