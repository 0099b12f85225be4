"""An epoch that a resumed trial runs again is logged to its MLflow run once."""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from orchestrator.tracking import MlflowTrialTracker, TrackingTarget, ensure_experiment


def test_an_epoch_logged_again_keeps_one_row_per_step(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = ensure_experiment(TrackingTarget(uri), "steps")
    client = MlflowClient(tracking_uri=uri)
    parent = client.create_run(experiment_id).info.run_id
    tracker = MlflowTrialTracker(uri, experiment_id, parent, "steps")
    run_id = tracker.start({"norm": "batchnorm"}, "t1", "train_t1")
    for epoch in (1, 2, 3, 2, 3, 4):  # killed after epoch 3, resumed from the checkpoint of epoch 1
        tracker.log_epoch(run_id, epoch, {"train_loss": 1.0 / epoch, "clean_acc": 0.1 * epoch, "note": "text"})
    for key in ("train_loss", "clean_acc"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [1, 2, 3, 4], key
    assert client.get_run(run_id).data.metrics["clean_acc"] == 0.4
