"""Profiles: named partial search files that ``--profile NAME`` merges over the file.

What the merge makes of a file (a value from the profile, one from the file, a command-line
override beating the profile; knobs changing sections; stages), what is refused and how
(an unknown profile, a profile that breaks the file, a malformed ``profiles:``), that
``normlab validate`` checks every profile, that the built-in paper spaces' ``paper`` profiles
validate, and one real search submitted with a profile: its MLflow parent run, its trial,
its record on disk and ``normlab resume``.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from conftest import run_normlab
from mlflow.tracking import MlflowClient

from orchestrator.searchfile.load import UnknownProfile, builtin_spaces, load_every_profile, load_space
from orchestrator.searchfile.profiles import merge_layer
from orchestrator.searchfile.space import SearchSpace, SpaceError

SPACE = """
name: prof
fixed: {dataset: digits, model: cnn, epochs: 2, lr: 0.05}
grid:
  norm: [batchnorm, robustnorm]
  norm_power: {values: [0.2, 1.0], when: {norm: [robustnorm]}}
seeds: [0, 1]
search: {algorithm: grid, metric: clean_acc, scheduler: fifo}
profiles:
  big:
    fixed: {epochs: 5, train_subset: 128}
    grid:
      norm_power: [0.5]
    search: {num_samples: 2, scheduler: {type: asha, grace_period: 2}}
    resources: {gpu: 0.5}
  one_norm:
    fixed: {norm: robustnorm, seed: 3}
"""


def write(folder: Path, text: str, name: str = "space.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


# ------------------------------------------------------------------ the merge


def test_a_profile_merges_over_the_file_and_overrides_beat_it(tmp_path):
    path = write(tmp_path, SPACE)
    space, _ = load_space(str(path), profile="big")
    assert space.profile == "big"
    assert space.fixed["epochs"] == 5 and space.fixed["train_subset"] == 128  # from the profile
    assert space.fixed["lr"] == 0.05 and space.grid["norm"].values == ["batchnorm", "robustnorm"]  # from the file
    assert space.search.algorithm == "grid" and space.search.metric == "clean_acc"  # mappings merge key by key
    assert space.search.num_samples == 2 and space.resources.gpu == 0.5
    assert space.search.scheduler.type == "asha" and space.search.scheduler.grace_period == 2  # fifo meets a mapping
    # a grid key's list meets the file's mapping as {values: ...}: the condition stays
    assert space.grid["norm_power"].values == [0.5] and space.grid["norm_power"].when == {"norm": ["robustnorm"]}
    assert space.trial_count() == 2 * 2 * 2  # (batchnorm, robustnorm x 1 power) x 2 seeds x 2 samples

    overridden, _ = load_space(str(path), ["epochs=7", "num_samples=3"], profile="big")
    assert overridden.fixed["epochs"] == 7 and overridden.search.num_samples == 3  # the command line wins
    assert overridden.fixed["train_subset"] == 128 and overridden.profile == "big"

    plain, _ = load_space(str(path))
    assert plain.profile is None and plain.fixed["epochs"] == 2 and "train_subset" not in plain.fixed
    assert "profile" not in plain.model_dump(mode="json")  # a space without a profile dumps as before


def test_a_knob_the_profile_fixes_leaves_the_grid_and_seed_replaces_seeds(tmp_path):
    space, _ = load_space(str(write(tmp_path, SPACE)), profile="one_norm")
    assert space.fixed["norm"] == "robustnorm" and "norm" not in space.grid
    assert space.fixed["seed"] == 3 and "seed" not in space.grid  # no seeds: grid over seed
    assert space.trial_count() == 2  # norm_power 0.2 and 1.0


def test_overrides_and_profiles_merge_the_same_way(tmp_path):
    path = write(tmp_path, SPACE)
    by_profile, _ = load_space(str(path), profile="one_norm")
    by_overrides, _ = load_space(str(path), ["norm=robustnorm", "seed=3"])
    assert by_profile.model_dump(exclude={"profile"}) == by_overrides.model_dump()


def test_a_profile_reaches_into_stages(tmp_path):
    path = write(
        tmp_path,
        """
        name: staged
        fixed: {dataset: digits, model: cnn, norm: batchnorm}
        stages:
          pretrain: {fixed: {regime: standard, epochs: 3}}
          finetune:
            init_from: pretrain
            grid: {regime: [bn_finetune_adv, pgd_at]}
        search: {scheduler: fifo}
        profiles:
          quick:
            fixed: {epochs: 1}
            stages:
              finetune: {grid: {regime: [bn_finetune_adv]}}
        """,
    )
    space, _ = load_space(str(path), profile="quick")
    assert space.fixed["epochs"] == 1 and "epochs" not in space.stages["pretrain"].fixed  # holds for every stage
    assert space.stages["pretrain"].fixed == {"regime": "standard"}
    assert space.stages["finetune"].grid["regime"].values == ["bn_finetune_adv"]
    assert space.stages["finetune"].init_from.stage == "pretrain"


def test_merge_layer_leaves_its_inputs_alone():
    raw = {"name": "x", "fixed": {"epochs": 2}, "grid": {"lr": [0.1, 0.2]}, "search": {"scheduler": "fifo"}}
    layer = {"fixed": {"lr": 0.3}, "search": {"scheduler": {"grace_period": 2}}}
    merged = merge_layer(raw, layer)
    assert merged == {
        "name": "x",
        "fixed": {"epochs": 2, "lr": 0.3},
        "grid": {},
        "search": {"scheduler": {"type": "fifo", "grace_period": 2}},
    }
    assert raw["grid"] == {"lr": [0.1, 0.2]} and raw["search"] == {"scheduler": "fifo"}
    assert layer == {"fixed": {"lr": 0.3}, "search": {"scheduler": {"grace_period": 2}}}
    assert merge_layer({"name": "x", "resources": 2}, {"resources": {"gpu": 1}})["resources"] == 2  # left to validation


# ------------------------------------------------------------------ refusals


def test_an_unknown_profile_lists_the_files_profiles(tmp_path):
    path = write(tmp_path, SPACE)
    with pytest.raises(UnknownProfile, match=r"no profile 'bgi' \(--profile\); its profiles: big, one_norm"):
        load_space(str(path), profile="bgi")
    with pytest.raises(UnknownProfile, match="it defines none"):
        load_space("quickstart", profile="paper")


@pytest.mark.parametrize("command", ["validate", "submit"])
def test_an_unknown_profile_is_exit_2_before_anything_starts(tmp_path, command):
    path = write(tmp_path, SPACE)
    proc = run_normlab(command, str(path), "--profile", "bgi", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "unknown profile" in proc.stderr and "its profiles: big, one_norm" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "normlab_runs").exists()  # no Ray, no store


def test_a_profile_that_breaks_the_file_is_named_in_the_error(tmp_path):
    path = write(tmp_path, SPACE + "  broken:\n    fixed: {epochs: 0}\n    search: {metric: final_adv_acc}\n")
    with pytest.raises(SpaceError) as info:
        load_space(str(path), profile="broken")
    message = str(info.value)
    assert message.startswith(f"{path} with profile broken: search.metric: unknown metric 'final_adv_acc'"), message
    load_space(str(path))  # the file itself is fine

    proc = run_normlab("submit", str(path), "--profile", "broken", cwd=tmp_path)
    assert proc.returncode == 2 and f"{path} with profile broken: search.metric" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("profiles", "expected"),
    [
        ("profiles: [paper]\n", "profiles: a mapping of profile names to partial search files"),
        ("profiles: {paper: 3}\n", "profiles.paper: a partial search file: a mapping of the keys it changes, got 3"),
        ("profiles: {paper: {fixd: {}}}\n", "profiles.paper.fixd: unknown key (a profile may set: name, description"),
        (
            "profiles: {paper: {data_options: []}}\n",
            "profiles.paper.data_options: data_options is chosen before a profile applies",
        ),
        ("profiles: {paper: {profiles: {}}}\n", "profiles.paper.profiles: profiles do not nest"),
        ("profiles: {'a b': {}}\n", "profiles.a b: profile name 'a b': letters, digits"),
        ("profile: paper\n", "profile: a profile is chosen with --profile NAME on the command line"),
        ("profiles: {" + ", ".join(f"p{i}: {{}}" for i in range(101)) + "}\n", "profiles: 101 profiles; at most 100"),
    ],
)
def test_a_malformed_profiles_section_says_what_is_wanted(tmp_path, profiles, expected):
    path = write(tmp_path, "name: x\nfixed: {epochs: 2}\n" + profiles)
    with pytest.raises(SpaceError) as info:
        load_space(str(path))
    assert expected in str(info.value)
    assert all(line.startswith(f"{path}: ") for line in str(info.value).splitlines())


# ------------------------------------------------------------------ validate checks every profile


def test_validate_checks_the_file_and_every_profile(tmp_path):
    path = write(tmp_path, SPACE)
    proc = run_normlab("validate", str(path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"{path}: ok: search 'prof', 6 trial(s)")
    assert lines[1].startswith(f"{path} with profile big: ok: search 'prof', 8 trial(s)")
    assert lines[2].startswith(f"{path} with profile one_norm: ok: search 'prof', 2 trial(s)")
    assert len(lines) == 3

    one = run_normlab("validate", str(path), "--profile", "one_norm", "epochs=1", cwd=tmp_path)
    assert one.returncode == 0 and one.stdout.startswith(f"{path} with profile one_norm: ok"), one.stderr
    assert len(one.stdout.splitlines()) == 1


def test_validate_finds_a_broken_profile_the_file_hides(tmp_path):
    path = write(tmp_path, SPACE + "  broken:\n    fixed: {epochs: 0}\n")
    proc = run_normlab("validate", str(path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout
    assert f"{path} with profile broken: fixed.epochs: Input should be greater than 0" in proc.stderr
    assert f"{path}: ok" in proc.stdout and f"{path} with profile big: ok" in proc.stdout  # the others pass
    assert "Traceback" not in proc.stderr

    results = dict(load_every_profile(str(path))[1])
    assert set(results) == {None, "big", "one_norm", "broken"}
    assert isinstance(results["broken"], SpaceError) and isinstance(results["big"], SearchSpace)


# ------------------------------------------------------------------ the built-in paper spaces


@pytest.mark.parametrize("name", ["robustnorm_paper", "fragile_features", "robustnorm_optuna"])
def test_every_builtin_paper_space_has_a_paper_profile_that_validates(name):
    small, _ = load_space(name)
    paper, _ = load_space(name, profile="paper")
    assert paper.profile == "paper" and paper.name == small.name
    assert paper.fixed["dataset"] == "cifar10" and paper.fixed["model"] == "resnet20"
    assert paper.fixed["lr_schedule"] == "step" and paper.resources.gpu == 0.5
    assert paper.fixed["epochs"] > small.fixed["epochs"]
    header = [line for line in builtin_spaces()[name].read_text().splitlines() if line.startswith("#")]
    assert any(f"normlab submit {name} --profile paper" in line for line in header)
    assert not any("epochs=" in line for line in header), "the header still carries an override line"


def test_the_papers_settings_are_in_the_robustnorm_paper_profile():
    fixed = load_space("robustnorm_paper", profile="paper")[0].fixed
    assert (fixed["epochs"], fixed["lr"], fixed["lr_milestones"], fixed["lr_gamma"]) == (164, 0.1, [80, 120], 0.1)
    assert (fixed["momentum"], fixed["weight_decay"], fixed["batch_size"], fixed["train_eps"]) == (0.9, 1e-4, 128, 0.03)
    assert fixed["eval_eps"][:2] == [0.004, 0.008] and fixed["final_adv_samples"] is None


# ------------------------------------------------------------------ a real search with a profile

TINY = """
name: profiled
fixed:
  dataset: digits
  model: cnn
  norm: batchnorm
  epochs: 3
  train_subset: 512
  batch_size: 64
  eval_attacks: [fgsm]
  eval_eps: [0.1]
  epoch_adv_samples: 32
  final_adv_samples: 32
search: {algorithm: grid, metric: adv_acc, mode: max}
resources: {cpu: 1}
profiles:
  tiny:
    fixed: {epochs: 1, train_subset: 128}
"""


def test_a_search_submitted_with_a_profile_records_it_and_resumes_with_it(tmp_path):
    from orchestrator.state.records import find_experiment, load_record

    write(tmp_path, TINY, "tiny.yaml")
    proc = run_normlab("submit", "tiny.yaml", "--profile", "tiny", "--num-cpus", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "search 'profiled' (profile 'tiny'): 1 trial(s)" in proc.stderr
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'normlab_runs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("profiled")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 1
    assert parents[0].data.tags["normlab.profile"] == "tiny" and parents[0].data.params["profile"] == "tiny"
    trial = children[0]
    assert trial.data.params["epochs"] == "1" and trial.data.params["train_subset"] == "128"  # the profile's
    assert trial.data.params["batch_size"] == "64"  # the file's
    assert [m.step for m in client.get_metric_history(trial.info.run_id, "clean_acc")] == [1]

    # the record keeps the merged space and the profile: resume runs what was submitted
    folder = find_experiment("profiled", str(tmp_path / "normlab_runs" / "ray_results"))
    record, space = load_record(folder)
    assert record.space["profile"] == "tiny" and space.profile == "tiny"
    assert space.fixed["epochs"] == 1 and space.fixed["train_subset"] == 128
    write(tmp_path, TINY.replace("epochs: 1,", "epochs: 4,"), "tiny.yaml")  # the file changes: the search does not
    resumed = run_normlab("resume", "profiled", "--num-cpus", "1", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resuming search profiled-" in resumed.stderr
    parent = client.get_run(parents[0].info.run_id)
    assert "normlab.resumed_at" in parent.data.tags and parent.data.tags["normlab.profile"] == "tiny"
    assert [m.step for m in client.get_metric_history(trial.info.run_id, "clean_acc")] == [1]
    assert load_record(folder)[1].fixed["epochs"] == 1
