"""Optuna searching RobustNorm's hyperparameters under ASHA, on a local Ray."""

from __future__ import annotations

import textwrap

from conftest import run_normlab
from mlflow.tracking import MlflowClient

SPACE = """
name: rn_optuna
fixed: {dataset: digits, model: cnn, epochs: 4, train_subset: 256, batch_size: 64, eval_attacks: [fgsm],
        eval_eps: [0.1], epoch_adv_samples: 64, final_adv_samples: 64}
grid:
  norm: [robustnorm, robustnorm_batchstats, batchnorm]
sample:
  lr: {loguniform: [0.01, 0.3]}
  norm_power: {uniform: [0.1, 0.5], when: {norm: [robustnorm, robustnorm_batchstats]}}
search:
  algorithm: optuna
  num_samples: 6
  metric: clean_acc
  mode: max
  scheduler: {type: asha, grace_period: 1, reduction_factor: 2}
  sampler_seed: 3
  sampler_options: {n_startup_trials: 3, constant_liar: true}  # TPE models from trial 4
resources: {cpu: 1}
"""


def test_optuna_with_asha_searches_and_every_run_ends_properly(tmp_path):
    (tmp_path / "space.yaml").write_text(textwrap.dedent(SPACE))
    proc = run_normlab("submit", "space.yaml", "--num-cpus", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "6 trial(s)" in proc.stderr

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'normlab_runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rn_optuna")
    runs = client.search_runs([experiment.experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 6
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert (
        parent.data.params["sampler.n_startup_trials"] == "3" and parent.data.params["sampler.constant_liar"] == "True"
    )
    lrs = {float(c.data.params["lr"]) for c in children}
    assert len(lrs) == 6 and all(0.01 <= lr <= 0.3 for lr in lrs)  # sampled, log-uniformly bounded
    for child in children:
        params = child.data.params
        if params["norm"] == "batchnorm":
            assert params["norm_power"] == "0.2"  # not applicable: the default, not a sample
        epochs = [m.step for m in client.get_metric_history(child.info.run_id, "clean_acc")]
        if child.info.status == "FINISHED":
            assert epochs == [1, 2, 3, 4] and "final_adv_acc" in child.data.metrics
        else:  # stopped early by ASHA: closed as KILLED, with the reason
            assert child.info.status == "KILLED", child.data.tags
            assert "scheduler" in child.data.tags["normlab.stopped"] and len(epochs) < 4
    powers = {float(c.data.params["norm_power"]) for c in children if c.data.params["norm"] != "batchnorm"}
    assert powers and all(0.1 <= p <= 0.5 for p in powers) and powers != {0.2}
