"""Optuna searches: settings that cannot work are refused, the conditional space holds, the
study lives in RDB storage, and a killed multi-objective search resumes into the same
study with every Ray trial in it exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import optuna
import pytest
from conftest import normlab_env, run_normlab
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from orchestrator.spaces import SpaceError, load_space
from orchestrator.study import RAY_TRIAL_ATTR, StudySearch, make_sampler, pareto_front, rdb_storage
from orchestrator.tuner import OptunaSpace

SPACE = """
name: {name}
fixed: {{dataset: digits, epochs: {epochs}, train_subset: 256, batch_size: 64, eval_attacks: [fgsm], eval_eps: [0.1],
        epoch_adv_samples: 64, final_adv_samples: 64, test_subset: 96}}
grid: {{norm: [batchnorm, robustnorm]}}
sample:
  norm_power: {{uniform: [0.1, 1.0], when: {{norm: [robustnorm]}}}}
  lr: {{loguniform: [0.02, 0.2]}}
search: {{algorithm: optuna, num_samples: {trials}, metric: [clean_acc, adv_acc], mode: [max, max],
         max_concurrent_trials: 2}}
resources: {{cpu: 1}}
"""


def load(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent(text))
    return load_space(str(path))[0]


@pytest.mark.parametrize(("search", "expected"), [
    ("{algorithm: optuna, metric: [clean_acc, adv_acc], scheduler: {type: asha}}",
     "ASHA cannot stop trials on several metrics: it ranks trials on one metric at each rung"),
    ("{algorithm: optuna, metric: [clean_acc, adv_acc], sampler: cmaes}", "CMA-ES optimises a single objective"),
    ("{algorithm: random, metric: [clean_acc, adv_acc]}", "several metrics need algorithm optuna"),
    ("{algorithm: optuna, metric: [clean_acc, adv_acc], mode: [max]}", "mode lists 1 value(s) for 2 metric(s)"),
    ("{algorithm: grid, sampler: tpe}", "sampler and storage are Optuna settings"),
    ("{algorithm: optuna, storage: 'postgresql://u:secret@db/optuna'}", "the study storage URL carries a password"),
])
def test_settings_that_cannot_work_are_refused_with_the_reason(tmp_path, search, expected):
    with pytest.raises(SpaceError, match="search") as info:
        load(tmp_path, f"name: x\nfixed: {{epochs: 2}}\nsearch: {search}\n")
    assert expected in str(info.value)


def test_seeds_are_refused_for_an_optuna_search(tmp_path):
    with pytest.raises(SpaceError, match="Optuna would treat seed as one more parameter to tune"):
        load(tmp_path, "name: x\nseeds: [0, 1]\nsearch: {algorithm: optuna}\n")


def test_defaults_tpe_for_one_metric_nsgaii_for_several(tmp_path):
    one = load(tmp_path, "name: x\nsearch: {algorithm: optuna}\n").search
    two = load(tmp_path, SPACE.format(name="x", epochs=2, trials=4)).search
    assert (one.sampler_name, one.multi_objective) == ("tpe", False)
    assert (two.sampler_name, two.multi_objective, two.metrics, two.modes) == ("nsgaii", True, ["clean_acc", "adv_acc"], ["max", "max"])
    for name in ("tpe", "nsgaii", "cmaes", "qmc", "random"):
        assert make_sampler(name, 0) is not None
    listed = load(tmp_path, "name: x\nsearch: {algorithm: optuna, metric: [adv_acc], mode: [min]}\n").search
    assert (listed.metric, listed.mode, listed.multi_objective) == ("adv_acc", "min", False)  # what Tune accepts


def test_the_conditional_space_never_gives_norm_power_to_a_batchnorm_trial(tmp_path):
    space = load(tmp_path, SPACE.format(name="x", epochs=2, trials=4))
    study = optuna.create_study(directions=["maximize", "maximize"], sampler=make_sampler("nsgaii", 0))
    define = OptunaSpace(space)
    seen = set()
    for _ in range(200):
        trial = study.ask()
        define(trial)
        seen.add(trial.params["norm"])
        assert ("norm_power" in trial.params) == (trial.params["norm"] == "robustnorm"), trial.params
        assert 0.02 <= trial.params["lr"] <= 0.2
        study.tell(trial, [0.5, 0.5])
    assert seen == {"batchnorm", "robustnorm"}


def test_trials_handed_out_but_never_run_are_marked_failed(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = load(tmp_path, SPACE.format(name="x", epochs=2, trials=4))
    searcher = StudySearch(space=OptunaSpace(space), metric=["clean_acc", "adv_acc"], mode=["max", "max"],
                           sampler=make_sampler("nsgaii", 0), storage=rdb_storage(url), study_name="s")
    searcher.suggest("ray-1")
    orphan = searcher._ot_study.ask()  # handed out after Ray's last snapshot of the searcher
    assert searcher.fail_orphans() == [orphan.number]
    study = optuna.load_study(study_name="s", storage=url)
    states = {t.number: t.state for t in study.trials}
    assert states == {0: TrialState.RUNNING, 1: TrialState.FAIL}
    assert study.trials[0].user_attrs[RAY_TRIAL_ATTR] == "ray-1" and "normlab.lost" in study.trials[1].user_attrs


def test_pareto_front():
    points = [(0.9, 0.1), (0.5, 0.5), (0.4, 0.4), (0.1, 0.9), (0.9, 0.05)]
    assert pareto_front(points, ["max", "max"]) == [0, 1, 3]
    assert pareto_front(points, ["min", "max"]) == [3]


@pytest.mark.slow
def test_a_killed_multi_objective_search_resumes_into_the_same_study(tmp_path):
    trials = 8
    (tmp_path / "space.yaml").write_text(textwrap.dedent(SPACE.format(name="mo", epochs=3, trials=trials)))
    url = f"sqlite:///{tmp_path / 'normlab_runs' / 'optuna.db'}"
    driver = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "submit", "space.yaml", "--num-cpus", "2"], cwd=tmp_path,
        env=normlab_env(), stdout=subprocess.DEVNULL, stderr=(tmp_path / "submit.log").open("w"), start_new_session=True,
    )
    before: dict[int, tuple] = {}
    try:
        deadline = time.time() + 600
        while time.time() < deadline and driver.poll() is None:
            try:
                names = optuna.get_all_study_names(url)
                study = optuna.load_study(study_name=names[0], storage=url) if names else None
            except Exception:
                study = None
            done = [t for t in study.trials if t.state == TrialState.COMPLETE] if study else []
            if len(done) >= 3:
                before = {t.number: (tuple(t.values), dict(t.params)) for t in done}
                break
            time.sleep(0.5)
        assert driver.poll() is None and before, (tmp_path / "submit.log").read_text()[-3000:]
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    time.sleep(3)
    resumed = run_normlab("resume", "mo", "--num-cpus", "2", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    study = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)
    assert study.study_name.startswith("mo-") and len(study.directions) == 2
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    others = [t for t in study.trials if t.state != TrialState.COMPLETE]
    assert len(complete) == trials  # every Ray trial told to the study ...
    ray_ids = [t.user_attrs[RAY_TRIAL_ATTR] for t in complete]
    assert len(set(ray_ids)) == trials  # ... exactly once
    assert all(t.state == TrialState.FAIL and "normlab.lost" in t.user_attrs for t in others)  # nothing left RUNNING
    for number, (values, params) in before.items():  # the history from before the kill is intact
        assert (tuple(study.trials[number].values), study.trials[number].params) == (values, params)
    assert [t.number for t in study.trials] == list(range(len(study.trials)))
    for t in complete:
        assert ("norm_power" in t.params) == (t.params["norm"] == "robustnorm")

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'normlab_runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mo")
    runs = {r.data.tags["normlab.trial_id"]: r for r in client.search_runs([experiment.experiment_id])
            if "mlflow.parentRunId" in r.data.tags}
    assert set(runs) == set(ray_ids)
    for t in complete:  # the study holds what each trial reported at its last epoch
        run = runs[t.user_attrs[RAY_TRIAL_ATTR]]
        assert run.info.status == "FINISHED"
        assert t.values == pytest.approx([run.data.metrics["clean_acc"], run.data.metrics["adv_acc"]])
    points = [tuple(t.values) for t in complete]
    front = {complete[i].number for i in pareto_front(points, ["max", "max"])}
    assert front == {t.number for t in study.best_trials}  # normlab's Pareto front is Optuna's
    # the report draws the front and the study's parameter importances, and logs them to the parent run
    from click.testing import CliRunner

    from orchestrator.cli import main

    result = CliRunner().invoke(main, ["report", "mo", "--compare", "norm", "--out", str(tmp_path / "report"),
                                       "--tracking-uri", f"sqlite:///{tmp_path / 'normlab_runs' / 'mlflow.db'}"])
    assert result.exit_code == 0, result.stderr
    assert {"pareto_front.png", "param_importances.png"} <= {p.name for p in (tmp_path / "report").iterdir()}
    parent = next(r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.tags["normlab.study"] == study.study_name
    assert {"report/pareto_front.png", "report/param_importances.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "report")}
