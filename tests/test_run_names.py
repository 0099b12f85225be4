"""Trial run names: what varies, readable and compact; numbered when two trials would share one."""

from __future__ import annotations

import json

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.running.driver import SearchRecord
from orchestrator.tracking.run_names import format_value, run_name, trial_number, varying_keys
from orchestrator.tracking.search_run import start_search_run
from orchestrator.tracking.target import resolve_tracking
from orchestrator.tracking.trial_runs import MlflowTrialTracker
from trainables.record import TrialRecord


@pytest.mark.parametrize(
    "value, text",
    [
        (0.31, "0.31"),
        (0.3100001, "0.31"),
        (1e-4, "1e-4"),
        (5e-4, "5e-4"),
        (0.05, "0.05"),
        (1e12, "1e12"),
        (0.123456, "0.123"),
        (2.0, "2"),
        (3, "3"),
        (True, "true"),
        ([0.1, 0.05], "0.1,0.05"),
        ("pgd_at", "pgd_at"),
        ("it's `x`", "it_s_x_"),
        (None, "none"),
    ],
)
def test_values_are_compact_and_safe_in_filter_strings(value, text):
    assert format_value(value) == text


def test_names_show_norm_regime_then_what_varies_with_short_labels():
    keys = varying_keys(["norm", "seed", "regime", "norm_power", "weight_decay", "model"])
    assert keys == ("norm_power", "weight_decay", "model", "seed")  # file order, seed last, norm/regime first anyway
    config = {
        "norm": "robustnorm",
        "regime": "pgd_at",
        "norm_power": 0.31,
        "weight_decay": 5e-4,
        "model": "resnet20",
        "seed": 0,
        "lr": 0.1,
    }
    assert run_name(config, keys, "b4ef5_00003") == "robustnorm pgd_at p=0.31 wd=5e-4 resnet20 seed 0"
    assert run_name(config, keys, "b4ef5_00003", number=True) == "robustnorm pgd_at p=0.31 wd=5e-4 resnet20 seed 0 #3"
    assert (
        run_name({"norm": "batchnorm", "regime": "standard", "train_eps": 0.0314}, ["train_eps", "lr"])
        == "batchnorm standard eps=0.0314"
    )  # a key the config lacks is left out
    assert run_name({}, ["lr"]) == "trial"  # a configuration that never validated
    when = {"norm_power": {"norm": ["robustnorm", "robustnorm_mixed"]}}  # a conditional grid key
    assert (
        run_name({"norm": "batchnorm", "regime": "standard", "norm_power": 0.2}, ["norm_power"], conditions=when)
        == "batchnorm standard"
    )  # the default p of a batchnorm trial is no part of its name
    assert (
        run_name({"norm": "robustnorm", "regime": "standard", "norm_power": 0.2}, ["norm_power"], conditions=when)
        == "robustnorm standard p=0.2"
    )
    assert trial_number("b4ef5_00003") == 3 and trial_number("nodigits") is None


def _tracker(tmp_path, **fields) -> tuple[MlflowTrialTracker, MlflowClient]:
    target = resolve_tracking(None, tmp_path)
    spec = tmp_path / "space.yaml"
    spec.write_text("name: names\n")
    tracker = start_search_run(
        target, "names", "names-20250101-000000", params={}, spec={}, spec_file=spec, tags={}, **fields
    )
    return tracker, MlflowClient(tracking_uri=target.uri)


def _record(trial_id: str, **config) -> TrialRecord:
    return TrialRecord(
        trial_id, f"train_{trial_id}", config={"norm": "robustnorm", "regime": "pgd_at", **config}, epochs=2
    )


def test_child_runs_get_readable_names_and_a_number_when_a_name_is_taken(tmp_path):
    tracker, client = _tracker(tmp_path, name_keys=("norm_power",))
    assert tracker.search_run == "names-20250101-000000"
    records = [
        _record("ab123_00000", norm_power=0.31),
        _record("ab123_00001", norm_power=0.5),
        _record("ab123_00002", norm_power=0.31),
    ]  # e.g. Optuna proposing the same value again
    for record in records:
        assert tracker.sync(record, budget_s=10)
    names = {client.get_run(r.run_id).info.run_name for r in records}
    assert names == {"robustnorm pgd_at p=0.31", "robustnorm pgd_at p=0.5", "robustnorm pgd_at p=0.31 #2"}
    for record in records:  # the Ray trial name stays a tag, and every run carries its search's run name
        tags = client.get_run(record.run_id).data.tags
        assert tags["normlab.trial_name"] == record.trial_name
        assert tags["normlab.search_run"] == "names-20250101-000000"
    parent = client.get_run(tracker.parent_run_id)
    assert parent.data.tags["normlab.search_run"] == "names-20250101-000000"
    kind = client.get_experiment(tracker.experiment_id).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"


def test_repeated_configurations_are_all_numbered(tmp_path):
    tracker, client = _tracker(tmp_path, name_keys=(), number_names=True)
    records = [_record(f"cd456_0000{i}") for i in range(2)]
    for record in records:
        assert tracker.sync(record, budget_s=10)
    assert sorted(client.get_run(r.run_id).info.run_name for r in records) == [
        "robustnorm pgd_at #0",
        "robustnorm pgd_at #1",
    ]


def test_a_search_record_written_before_readable_names_still_loads_and_names_runs_as_before(tmp_path):
    tracker, client = _tracker(
        tmp_path, name_keys=("norm_power",), name_conditions={"norm_power": {"norm": ["robustnorm"]}}
    )
    record = SearchRecord({"name": "names"}, "space.yaml", tracker)
    old = json.loads(record.to_json())
    for field in ("name_keys", "name_conditions", "number_names", "search_run"):
        old["tracker"].pop(field, None)  # as an earlier normlab wrote it (defaults are not written now)
    loaded = SearchRecord.from_json(json.dumps(old)).tracker
    assert loaded.name_keys is None and loaded.search_run == "" and loaded.name_conditions == {}
    assert SearchRecord.from_json(record.to_json()).tracker == tracker  # new fields survive the round trip
    trial = _record("ef789_00000", norm_power=0.2)
    assert loaded.sync(trial, budget_s=10)
    assert client.get_run(trial.run_id).info.run_name == "train_ef789_00000"


def test_naming_does_not_need_a_reachable_server_to_be_decided():
    tracker = MlflowTrialTracker("http://127.0.0.1:9", "1", "p", "s", name_keys=("lr",))
    assert tracker.run_name(_record("aa000_00007", lr=0.05)) == "robustnorm pgd_at lr=0.05"
