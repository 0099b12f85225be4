"""Search-space files: every validation error path, overrides, and what trials they produce."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import optuna
import pytest
from ray.tune.search.variant_generator import generate_variants

from orchestrator.running.tuner import OptunaSpace, TrialResolver, param_space
from orchestrator.searchfile.load import builtin_spaces, load_space
from orchestrator.searchfile.space import SampleKey, SpaceError
from trainables.config import TrialConfig

GOOD = """
name: tiny
fixed: {dataset: digits, epochs: 2}
grid:
  norm: [batchnorm, robustnorm]
  regime: [standard, pgd_at]
"""


def write(tmp_path: Path, text: str, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path: Path, text: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(SpaceError) as info:
        load_space(str(path))
    message = str(info.value)
    assert all(line.startswith(f"{path}: ") for line in message.splitlines()), message
    return message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "name: x\nfixd: {epochs: 2}\n",
            "fixd: unknown key (allowed here: name, description, fixed, grid, sample, seeds, stages, search",
        ),
        ("fixed: {epochs: 2}\n", "name: Field required"),
        ("name: 'bad name'\n", "name: name 'bad name' must be letters"),
        ("name: x\nfixed: {epoch: 2}\n", "fixed.epoch: 'epoch' is not a trial knob; did you mean epochs?"),
        ("name: x\nfixed: {lr: -1}\n", "fixed.lr: Input should be greater than 0"),
        ("name: x\nfixed: {eval_eps: [0.1, 2]}\n", "fixed.eval_eps: Input should be less than or equal to 1"),
        (
            "name: x\ngrid: {norm: [batchnorm, robustnrom]}\n",
            "grid.norm[1]: unknown norm 'robustnrom'; known: batchnorm",
        ),
        ("name: x\ngrid: {model: []}\n", "grid.model.values: List should have at least 1 item"),
        ("name: x\ngrid: {nrom: [batchnorm]}\n", "grid.nrom: 'nrom' is not a trial knob; did you mean norm"),
        ("name: x\nfixed: {norm: batchnorm}\ngrid: {norm: [robustnorm]}\n", "grid.norm: also set in fixed"),
        (
            "name: x\nsample: {lr: {loguniform: [0, 0.1]}}\nsearch: {algorithm: random}\n",
            "sample.lr: loguniform: bounds must be > 0",
        ),
        (
            "name: x\nsample: {lr: {uniform: [0.1, 0.01]}}\nsearch: {algorithm: random}\n",
            "sample.lr: uniform: low must be below high",
        ),
        (
            "name: x\nsample: {lr: {normal: [0, 1]}}\nsearch: {algorithm: random}\n",
            "sample.lr.normal: unknown key (allowed here: uniform, loguniform, int, choice, when)",
        ),
        (
            "name: x\nsample: {lr: {uniform: [0.1, 0.2], choice: [1]}}\nsearch: {algorithm: random}\n",
            "give exactly one of uniform, loguniform, int, choice",
        ),
        (
            "name: x\nsample: {norm_power: {uniform: [0.1, 3.0]}}\nsearch: {algorithm: random}\n",
            "sample.norm_power.uniform[1]: Input should be less than or equal to 2",
        ),
        (
            "name: x\nsample: {model: {choice: [cnn, resnet99]}}\nsearch: {algorithm: random}\n",
            "sample.model.choice[1]: unknown model 'resnet99'",
        ),
        (
            "name: x\nsample: {lr: {uniform: [0.01, 0.1]}}\n",
            "search.algorithm: sampled keys need algorithm 'random' or 'optuna'",
        ),
        (
            "name: x\ngrid: {norm_power: {values: [0.1], when: {nrom: [robustnorm]}}}\n",
            "grid.norm_power.when.nrom: 'nrom' is not a trial knob",
        ),
        (
            "name: x\ngrid: {norm_power: {values: [0.1], when: {norm: [robustnrom]}}}\n",
            "grid.norm_power.when.norm[0]: unknown norm 'robustnrom'",
        ),
        (
            "name: x\nsample: {lr: {uniform: [0.01, 0.1]}, norm_power: {uniform: [0.1, 0.3], when: {lr: [0.1]}}}\nsearch: {algorithm: random}\n",
            "sample.norm_power.when.lr: a condition can only test fixed or grid keys",
        ),
        ("name: x\nsearch: {algorithm: bayes}\n", "search.algorithm: allowed: 'grid', 'random' or 'optuna'"),
        (
            "name: x\nsearch: {metric: final_adv_acc}\n",
            "search.metric: unknown metric 'final_adv_acc'; the search metric must be reported every epoch",
        ),
        ("name: x\nsearch: {mode: maximize}\n", "search.mode: allowed: 'max' or 'min'"),
        ("name: x\nsearch: {num_samples: 0}\n", "search.num_samples: Input should be greater than 0"),
        ("name: x\nsearch: {scheduler: {type: hyperband}}\n", "search.scheduler.type: allowed: 'fifo' or 'asha'"),
        (
            "name: x\nsearch: {scheduler: {type: asha, grace: 2}}\n",
            "search.scheduler.grace: unknown key (allowed here: type, max_t, grace_period, reduction_factor)",
        ),
        (
            "name: x\nsearch: {scheduler: {type: asha, reduction_factor: 1}}\n",
            "search.scheduler.reduction_factor: Input should be greater than 1",
        ),
        (
            "name: x\nfixed: {epochs: 3}\nsearch: {scheduler: {type: asha, grace_period: 5}}\n",
            "search.scheduler.grace_period: larger than max_t / epochs (3)",
        ),
        ("name: x\nresources: {cpu: 0}\n", "resources.cpu: Input should be greater than 0"),
        ("name: x\nresources: {gpu: -0.5}\n", "resources.gpu: Input should be greater than or equal to 0"),
        ("name: x\nresources: {cpus: 1}\n", "resources.cpus: unknown key (allowed here: cpu, gpu)"),
        ("name: x\nmax_failures: -2\n", "max_failures: Input should be greater than or equal to -1"),
        ("name: x\ncheckpoint: {every: 0}\n", "checkpoint.every: Input should be greater than 0"),
        (
            "name: x\ngrid: {norm: [batchnorm, none], regime: [standard, bn_only_adv]}\n",
            "grid combination 4 (norm=none, regime=bn_only_adv): regime 'bn_only_adv' trains only norm parameters",
        ),
        (
            "name: x\ngrid: {regime: [bn_finetune_adv]}\n",
            "grid combination 1 (regime=bn_finetune_adv): regime 'bn_finetune_adv' starts from a trained network",
        ),
        ("- just\n- a list\n", "expected a mapping at the top level"),
        ("name: x\nfixed: {a: [1, 2\n", "not valid YAML"),
    ],
)
def test_every_problem_names_file_path_and_what_is_allowed(tmp_path, text, expected):
    assert expected in problems(tmp_path, text)


def test_all_problems_are_reported_at_once(tmp_path):
    message = problems(
        tmp_path,
        """
        name: x
        fixed: {epoch: 3, lr: -1}
        grid: {norm: [batchnorm, robustnrom]}
    """,
    )
    assert "fixed.epoch" in message and "fixed.lr" in message and "grid.norm[1]" in message


def test_unknown_builtin_name_lists_the_builtins():
    with pytest.raises(SpaceError, match="built-in: .*quickstart"):
        load_space("quickstrat")


def test_quickstart_is_six_trials_of_the_issue():
    space, path = load_space("quickstart")
    assert path == builtin_spaces()["quickstart"]
    assert space.trial_count() == 6
    assert space.grid["norm"].values == ["batchnorm", "batchnorm_batchstats", "robustnorm"]
    assert space.grid["regime"].values == ["pgd_at", "standard"]  # the longer trials first
    assert space.fixed["dataset"] == "digits" and space.fixed["model"] == "cnn"
    assert space.fixed["eval_attacks"] == ["fgsm", "pgd"]


def test_overrides_fix_trial_keys_and_set_search_settings(tmp_path):
    path = write(tmp_path, GOOD)
    space, _ = load_space(str(path), ["epochs=1", "num_samples=3", "norm=robustnorm", "gpu=0.5", "scheduler=asha"])
    assert space.fixed["epochs"] == 1 and space.fixed["norm"] == "robustnorm" and "norm" not in space.grid
    assert space.search.num_samples == 3 and space.resources.gpu == 0.5 and space.search.scheduler.type == "asha"
    assert space.trial_count() == 2 * 3
    with pytest.raises(SpaceError, match="fixed.epochz: 'epochz' is not a trial knob"):
        load_space(str(path), ["epochz=1"])


def test_the_optuna_study_s_sampler_and_database_are_overrides(tmp_path):
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    space, _ = load_space("robustnorm_optuna", ["sampler=tpe", f"storage={url}", "metric=adv_acc", "mode=max"])
    assert space.search.sampler_name == "tpe" and space.search.storage == url
    with pytest.raises(SpaceError, match="search.storage"):  # checked like the file's own
        load_space("robustnorm_optuna", ["storage=postgresql://normlab:secret@db:5432/optuna"])


def resolved_trials(space) -> list[dict]:
    resolver = TrialResolver(space.fixed, frozenset(space.conditional_keys()))
    return [resolver(config) for _, config in generate_variants(param_space(space))]


def test_conditional_grid_keys_only_multiply_matching_trials(tmp_path):
    space, _ = load_space(
        str(
            write(
                tmp_path,
                """
        name: cond
        fixed: {epochs: 1}
        grid:
          norm: [batchnorm, robustnorm, robustnorm_mixed]
          norm_power: {values: [0.1, 0.3], when: {norm: [robustnorm, robustnorm_mixed]}}
    """,
            )
        )
    )
    trials = resolved_trials(space)
    assert len(trials) == space.trial_count() == 1 + 2 + 2
    assert sorted((t["norm"], t.get("norm_power")) for t in trials) == [
        ("batchnorm", None),
        ("robustnorm", 0.1),
        ("robustnorm", 0.3),
        ("robustnorm_mixed", 0.1),
        ("robustnorm_mixed", 0.3),
    ]
    for values in trials:
        TrialConfig.model_validate(values)


def test_sampled_keys_respect_bounds_and_conditions(tmp_path):
    space, _ = load_space(
        str(
            write(
                tmp_path,
                """
        name: sampled
        fixed: {epochs: 1}
        grid: {norm: [batchnorm, robustnorm]}
        sample:
          lr: {loguniform: [0.001, 0.1]}
          train_steps: {int: [2, 4]}
          norm_power: {uniform: [0.1, 0.5], when: {norm: [robustnorm]}}
        search: {algorithm: random, num_samples: 8}
    """,
            )
        )
    )
    trials = [t for _ in range(space.search.num_samples) for t in resolved_trials(space)]
    assert len(trials) == 16
    for t in trials:
        assert 0.001 <= t["lr"] <= 0.1 and t["train_steps"] in (2, 3, 4)
        assert ("norm_power" in t) == (t["norm"] == "robustnorm")
        if t["norm"] == "robustnorm":
            assert 0.1 <= t["norm_power"] <= 0.5
    assert len({t["lr"] for t in trials}) > 1 and {t["train_steps"] for t in trials} == {2, 3, 4}


def test_optuna_space_suggests_conditionally():
    space, _ = load_space("quickstart", ["algorithm=optuna", "num_samples=4"])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = space.model_copy(
        update={"sample": {"norm_power": SampleKey(uniform=(0.1, 0.5), when={"norm": ["robustnorm"]})}}
    )
    seen = []
    for _ in range(12):
        trial = study.ask()
        OptunaSpace(space)(trial)
        seen.append(dict(trial.params))
        study.tell(trial, 0.5)
    for params in seen:
        assert params["norm"] in space.grid["norm"].values and params["regime"] in ("standard", "pgd_at")
        assert ("norm_power" in params) == (params["norm"] == "robustnorm")


def test_validate_command_exit_codes(tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "validate", "quickstart", "epochs=2"], capture_output=True, text=True
    )
    assert ok.returncode == 0 and "6 trial(s)" in ok.stdout
    bad = write(tmp_path, "name: x\ngrid: {norm: [batchnrom]}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "validate", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert f"{bad}: grid.norm[0]: unknown norm 'batchnrom'" in " ".join(proc.stderr.split())
    assert "Traceback" not in proc.stderr
