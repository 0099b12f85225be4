"""Optuna searches: settings that cannot work are refused, the conditional space holds, the
study lives in RDB storage, and a killed multi-objective search resumes into the same
study with every Ray trial in it exactly once and its NSGA-II sampler's history kept (the
searcher's pickling itself: test_sampler_pickling.py)."""

from __future__ import annotations

import json
import os
import re
import signal
import textwrap
import time

import optuna
import pytest
from conftest import run_normlab, start_submit
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from orchestrator.running.tuner import OptunaSpace
from orchestrator.searchfile.load import load_space
from orchestrator.searchfile.space import SpaceError
from orchestrator.studies.study import (
    RAY_TRIAL_ATTR,
    StudySearch,
    make_sampler,
    pareto_front,
    rdb_storage,
    record_retried,
)

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


@pytest.mark.parametrize(
    ("search", "expected"),
    [
        (
            "{algorithm: optuna, metric: [clean_acc, adv_acc], scheduler: {type: asha}}",
            "ASHA cannot stop trials on several metrics: it ranks trials on one metric at each rung",
        ),
        ("{algorithm: optuna, metric: [clean_acc, adv_acc], sampler: cmaes}", "CMA-ES optimises a single objective"),
        ("{algorithm: random, metric: [clean_acc, adv_acc]}", "several metrics need algorithm optuna"),
        ("{algorithm: optuna, metric: [clean_acc, adv_acc], mode: [max]}", "mode lists 1 value(s) for 2 metric(s)"),
        ("{algorithm: grid, sampler: tpe}", "sampler, sampler_options and storage are Optuna settings"),
        ("{algorithm: optuna, storage: 'postgresql://u:secret@db/optuna'}", "the study storage URL carries a password"),
    ],
)
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
    assert (two.sampler_name, two.multi_objective, two.metrics, two.modes) == (
        "nsgaii",
        True,
        ["clean_acc", "adv_acc"],
        ["max", "max"],
    )
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
    searcher = StudySearch(
        space=OptunaSpace(space),
        metric=["clean_acc", "adv_acc"],
        mode=["max", "max"],
        sampler=make_sampler("nsgaii", 0),
        storage=rdb_storage(url),
        study_name="s",
    )
    searcher.suggest("ray-1")
    orphan = searcher._ot_study.ask()  # handed out after Ray's last snapshot of the searcher
    assert searcher.fail_orphans() == [orphan.number]
    study = optuna.load_study(study_name="s", storage=url)
    states = {t.number: t.state for t in study.trials}
    assert states == {0: TrialState.RUNNING, 1: TrialState.FAIL}
    assert study.trials[0].user_attrs[RAY_TRIAL_ATTR] == "ray-1" and "normlab.lost" in study.trials[1].user_attrs


def test_a_failed_trial_that_finishes_on_retry_is_added_to_the_study_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    space = load(tmp_path, SPACE.format(name="x", epochs=2, trials=4))
    metrics = ["clean_acc", "adv_acc"]
    searcher = StudySearch(
        space=OptunaSpace(space),
        metric=metrics,
        mode=["max", "max"],
        sampler=make_sampler("nsgaii", 0),
        storage=rdb_storage(url),
        study_name="s",
    )
    params = {ray_id: searcher.suggest(ray_id) for ray_id in ("ray-1", "ray-2", "ray-3")}
    searcher.on_trial_complete("ray-1", error=True)  # failed, then retried by `normlab resume`
    searcher.on_trial_complete("ray-2", result={"clean_acc": 0.9, "adv_acc": 0.2})
    searcher.on_trial_complete("ray-3", error=True)  # failed, and fails again
    searcher.on_trial_complete("ray-1", result={"clean_acc": 0.8, "adv_acc": 0.4})  # what Ray does: dropped
    assert optuna.load_study(study_name="s", storage=url).trials[0].state == TrialState.FAIL

    finished = {"ray-1": {"clean_acc": 0.8, "adv_acc": 0.4, "epoch": 2}, "ray-2": {"clean_acc": 0.9, "adv_acc": 0.2}}
    assert record_retried(url, "s", metrics, finished) == ["ray-1"]
    assert record_retried(url, "s", metrics, finished) == []  # once
    study = optuna.load_study(study_name="s", storage=url)
    assert [(t.number, t.state) for t in study.trials] == [
        (0, TrialState.FAIL),
        (1, TrialState.COMPLETE),
        (2, TrialState.FAIL),
        (3, TrialState.COMPLETE),
    ]
    copy = study.trials[3]
    assert (
        copy.values == [0.8, 0.4]
        and copy.user_attrs[RAY_TRIAL_ATTR] == "ray-1"
        and copy.user_attrs["normlab.retry_of"] == 0
    )
    assert copy.params == study.trials[0].params and {k: copy.params[k] for k in params["ray-1"]} == params["ray-1"]
    assert sorted(t.user_attrs[RAY_TRIAL_ATTR] for t in study.best_trials) == ["ray-1", "ray-2"]  # the front counts it


def test_pareto_front():
    points = [(0.9, 0.1), (0.5, 0.5), (0.4, 0.4), (0.1, 0.9), (0.9, 0.05)]
    assert pareto_front(points, ["max", "max"]) == [0, 1, 3]
    assert pareto_front(points, ["min", "max"]) == [3]


@pytest.mark.slow
def test_a_killed_multi_objective_search_resumes_into_the_same_study(tmp_path):
    trials = 8
    (tmp_path / "space.yaml").write_text(textwrap.dedent(SPACE.format(name="mo", epochs=3, trials=trials)))
    url = f"sqlite:///{tmp_path / 'normlab_runs' / 'optuna.db'}"
    driver = start_submit(tmp_path)
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
        generation = optuna.samplers.NSGAIISampler._get_generation_key()
        before_generations = {n: t.system_attrs[generation] for n, t in enumerate(study.trials) if n in before}
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
    handed = [t.user_attrs[RAY_TRIAL_ATTR] for t in study.trials if RAY_TRIAL_ATTR in t.user_attrs]
    assert len(set(handed)) == len(handed)  # no Ray trial twice in the study, lost ones included
    # the sampler's history is kept: each trial is in NSGA-II's generations (those from before the kill
    # unchanged), and its random stream went on from where it was instead of starting over from the seed
    # (a restarted stream would hand the first trials' parameters out again)
    assert {n: study.trials[n].system_attrs[generation] for n in before} == before_generations
    assert all(generation in t.system_attrs for t in complete)
    # trials the study handed out after Ray's last snapshot of the searcher (lost) were drawn from a
    # sampler state the restored searcher rewinds to, so the next draw may repeat one of them; no
    # other two trials share an lr
    kept = [t for t in study.trials if "normlab.lost" not in t.user_attrs]
    assert len({t.params["lr"] for t in kept}) == len(kept)
    for number, (values, params) in before.items():  # the history from before the kill is intact
        assert (tuple(study.trials[number].values), study.trials[number].params) == (values, params)
    assert [t.number for t in study.trials] == list(range(len(study.trials)))
    for t in complete:
        assert ("norm_power" in t.params) == (t.params["norm"] == "robustnorm")

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'normlab_runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mo")
    runs = {
        r.data.tags["normlab.trial_id"]: r
        for r in client.search_runs([experiment.experiment_id])
        if "mlflow.parentRunId" in r.data.tags
    }
    assert set(runs) == set(ray_ids)
    for t in complete:  # the study holds what each trial reported at its last epoch
        run = runs[t.user_attrs[RAY_TRIAL_ATTR]]
        assert run.info.status == "FINISHED"
        assert t.values == pytest.approx([run.data.metrics["clean_acc"], run.data.metrics["adv_acc"]])
    points = [tuple(t.values) for t in complete]
    front = {complete[i].number for i in pareto_front(points, ["max", "max"])}
    assert front == {t.number for t in study.best_trials}  # normlab's Pareto front is Optuna's
    # ... and the one resume printed at the end of the search
    printed = resumed.stderr[resumed.stderr.index("Pareto front of study") :]
    assert {int(n) for n in re.findall(r"^  trial (\d+): clean_acc", printed, re.M)} == front
    # the report draws the front and the study's parameter importances, and logs them to the parent run
    from click.testing import CliRunner

    from orchestrator.cli import main

    result = CliRunner().invoke(
        main,
        [
            "report",
            "mo",
            "--compare",
            "norm",
            "--out",
            str(tmp_path / "report"),
            "--tracking-uri",
            f"sqlite:///{tmp_path / 'normlab_runs' / 'mlflow.db'}",
        ],
    )
    assert result.exit_code == 0, result.stderr
    assert {"pareto_front.png", "param_importances.png"} <= {p.name for p in (tmp_path / "report").iterdir()}
    parent = next(r for r in client.search_runs([experiment.experiment_id]) if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.tags["normlab.study"] == study.study_name
    assert {"report/pareto_front.png", "report/param_importances.png"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "report")
    }


@pytest.mark.slow
def test_a_trial_that_failed_and_finished_on_resume_counts_in_the_study(tmp_path):
    trials = 3
    (tmp_path / "space.yaml").write_text(
        textwrap.dedent(SPACE.format(name="retry", epochs=2, trials=trials)) + "max_failures: 0\n"
    )
    plan = tmp_path / "faults.json"  # each trial's worker dies once, after its first checkpoint (no retry)
    plan.write_text(
        json.dumps(
            {"kills": [{"trial": "*", "epoch": 1, "point": "after_report"}], "state_dir": str(tmp_path / "faults")}
        )
    )
    url = f"sqlite:///{tmp_path / 'normlab_runs' / 'optuna.db'}"
    submitted = run_normlab("submit", "space.yaml", "--num-cpus", "2", cwd=tmp_path, NORMLAB_FAULTS=str(plan))
    assert submitted.returncode != 0 and f"{trials} trial(s) failed" in submitted.stderr, submitted.stderr[-3000:]
    study = optuna.load_study(study_name=optuna.get_all_study_names(url)[0], storage=url)
    failed = study.trials
    assert [t.state for t in failed] == [TrialState.FAIL] * trials

    resumed = run_normlab("resume", "retry", "--num-cpus", "2", cwd=tmp_path, NORMLAB_FAULTS=str(plan))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert f"{trials} trial(s) that had failed finished on retry" in resumed.stderr
    study = optuna.load_study(study_name=study.study_name, storage=url)
    assert study.trials[:trials] == failed  # the failed trials stay as they were
    copies = study.trials[trials:]
    assert [t.state for t in copies] == [TrialState.COMPLETE] * trials
    copied = sorted(copies, key=lambda t: t.user_attrs["normlab.retry_of"])  # one copy of each failed trial
    assert [(t.user_attrs["normlab.retry_of"], t.params) for t in copied] == [(t.number, t.params) for t in failed]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'normlab_runs' / 'mlflow.db'}")
    runs = {
        r.data.tags["normlab.trial_id"]: r
        for r in client.search_runs([client.get_experiment_by_name("retry").experiment_id])
        if "mlflow.parentRunId" in r.data.tags
    }
    for copy in copies:  # each holds what its trial reported at its last epoch
        run = runs[copy.user_attrs[RAY_TRIAL_ATTR]]
        assert run.info.status == "FINISHED" and run.data.metrics["epoch"] == 2
        assert copy.values == pytest.approx([run.data.metrics["clean_acc"], run.data.metrics["adv_acc"]])
    assert len(study.best_trials) >= 1  # the Pareto front is made of them
