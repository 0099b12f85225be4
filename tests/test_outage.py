"""An MLflow server that goes away for 90 s in the middle of a search.

A real `mlflow server` on 127.0.0.1 is stopped once the search has logged its first
epoch and started again on the same store 90 s later. Trials keep training meanwhile
(they wait a few seconds per epoch for the server, then carry on; what they could not
log waits in their checkpoints), the driver brings every run up to date once the server
is back, and the search ends as if nothing had happened: every run FINISHED, every epoch
step exactly once. While the server is down, `normlab report` says so in one line.
"""

from __future__ import annotations

import textwrap
import threading
import time

import pytest
from conftest import MlflowServer, run_normlab
from mlflow.tracking import MlflowClient

EPOCHS = 8
OUTAGE_S = 90
SPACE = f"""
name: outage
fixed: {{dataset: digits, epochs: {EPOCHS}, train_subset: 512, batch_size: 32, eval_attacks: [fgsm], eval_eps: [0.1],
        epoch_adv_samples: 64, final_adv_samples: 64, test_subset: 128}}
grid: {{norm: [batchnorm, robustnorm], regime: [standard, fgsm_at]}}
resources: {{cpu: 1}}
max_failures: 1
"""


@pytest.mark.slow
def test_a_90_second_mlflow_outage_mid_search_loses_and_repeats_nothing(tmp_path):
    (tmp_path / "space.yaml").write_text(textwrap.dedent(SPACE))
    server = MlflowServer(tmp_path).start()
    client = MlflowClient(tracking_uri=server.uri)
    timeline: dict[str, float] = {}
    during: dict[str, object] = {}

    def outage() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:  # the first epoch of some trial is in MLflow
            try:
                experiment = client.get_experiment_by_name("outage")
                runs = client.search_runs([experiment.experiment_id]) if experiment else []
                if any("epoch" in r.data.metrics for r in runs):
                    break
            except Exception:
                pass
            time.sleep(0.5)
        server.stop()
        timeline["down"] = time.time()
        during["report"] = run_normlab("report", "outage", "--tracking-uri", server.uri, cwd=tmp_path, timeout=120)
        time.sleep(max(0.0, OUTAGE_S - (time.time() - timeline["down"])))
        server.start()
        timeline["up"] = time.time()

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    try:
        started = time.time()
        proc = run_normlab(
            "submit",
            "space.yaml",
            "--num-cpus",
            "2",
            "--tracking-uri",
            server.uri,
            cwd=tmp_path,
            timeout=1200,
            NORMLAB_TRACKING_RETRY_S="3",
            NORMLAB_TRACKING_FINAL_WAIT_S="10",
        )
        ended = time.time()
        thread.join(timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert timeline["up"] - timeline["down"] >= OUTAGE_S - 1
        assert started < timeline["down"] and timeline["up"] < ended, "the outage must fall inside the search"

        report = during["report"]
        assert report.returncode == 2 and "Traceback" not in report.stderr
        assert "unreachable" in report.stderr and len(report.stderr.strip().splitlines()) <= 3

        experiment = client.get_experiment_by_name("outage")
        runs = client.search_runs([experiment.experiment_id])
        parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert len(trials) == 4
        for run in trials:
            assert run.info.status == "FINISHED", run.data.tags
            for metric in ("epoch", "train_loss", "clean_acc", "adv_acc"):
                steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, metric))
                assert steps == list(range(1, EPOCHS + 1)), (metric, steps)
            assert "final_adv_acc" in run.data.metrics
            assert {"result.json", "checkpoint"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
        # some epochs really were logged late: their timestamps fall after the server came back
        late = [
            m
            for run in trials
            for m in client.get_metric_history(run.info.run_id, "epoch")
            if m.timestamp / 1000 > timeline["up"] and m.step < EPOCHS
        ]
        assert late, "no epoch was delayed by the outage: the outage did not hit the search"
    finally:
        server.stop()
