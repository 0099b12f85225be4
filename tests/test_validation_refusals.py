"""What would fail once a search or a trial runs is refused first, and what README suggests is accepted.

Search files: ``scheduler: fifo`` and a stage's ``init_from: STAGE`` are shorthands for their
mappings; a name too long for a folder, a seed numpy cannot take, ``true`` for a number, an
``init_from`` file that does not exist and a study storage URL SQLAlchemy cannot use are refused
by ``load_space``, and so by ``normlab validate`` and ``normlab submit`` (exit 2, ``file: key.path:
reason``, no traceback). Command-line options: out-of-range numbers are usage errors, and a
``normlab trial --checkpoint-dir`` that cannot be written is refused before the first epoch.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from conftest import run_normlab

from orchestrator.searchfile.load import load_space
from orchestrator.searchfile.space import MAX_NAME_LENGTH, SpaceError
from trainables.config import MAX_SEED

STAGED = """
name: staged
fixed: {{dataset: digits, epochs: 1}}
search: {{scheduler: fifo}}
stages:
  pretrain:
    grid: {{norm: [batchnorm, robustnorm]}}
  finetune:
    init_from: {init_from}
    fixed: {{regime: bn_finetune_adv}}
    grid: {{norm: [batchnorm, robustnorm]}}
"""


def write(folder: Path, text: str, name: str = "space.yaml") -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def refusal(tmp_path: Path, text: str, *overrides: str) -> str:
    path = write(tmp_path, text)
    with pytest.raises(SpaceError) as info:
        load_space(str(path), overrides)
    message = str(info.value)
    assert all(line.startswith(f"{path}: ") for line in message.splitlines()), message
    return message


# ------------------------------------------------------------------ shorthands


@pytest.mark.parametrize("scheduler", ["fifo", "asha"])
def test_a_scheduler_by_its_name_is_the_mapping_with_that_type(tmp_path, scheduler):
    space, _ = load_space(str(write(tmp_path, f"name: x\nfixed: {{epochs: 2}}\nsearch: {{scheduler: {scheduler}}}\n")))
    assert space.search.scheduler.type == scheduler and space.search.scheduler.grace_period == 1


def test_a_scheduler_override_applies_to_a_scheduler_given_by_name(tmp_path):
    path = write(tmp_path, "name: x\nfixed: {epochs: 2}\nsearch: {scheduler: fifo}\n")
    assert load_space(str(path), ["scheduler=asha"])[0].search.scheduler.type == "asha"


@pytest.mark.parametrize(
    ("scheduler", "expected"),
    [
        ("hyperband", "search.scheduler.type: allowed: 'fifo' or 'asha'"),
        ("3", "search.scheduler: fifo or asha, or a mapping such as {type: asha, grace_period: 2} (got 3)"),
        ("[fifo]", "search.scheduler: fifo or asha, or a mapping"),
    ],
)
def test_a_scheduler_that_is_neither_a_name_nor_a_mapping_says_what_is(tmp_path, scheduler, expected):
    assert expected in refusal(tmp_path, f"name: x\nsearch: {{scheduler: {scheduler}}}\n")


def test_a_stage_starts_from_another_by_its_name(tmp_path):
    short, _ = load_space(str(write(tmp_path, STAGED.format(init_from="pretrain"))))
    long, _ = load_space(str(write(tmp_path, STAGED.format(init_from="{stage: pretrain}"))))
    assert short.stages["finetune"].init_from.stage == long.stages["finetune"].init_from.stage == "pretrain"


def test_a_section_that_is_not_a_mapping_lists_its_keys(tmp_path):
    assert "resources: expected a mapping (keys: cpu, gpu)" in refusal(tmp_path, "name: x\nresources: 2\n")


# ------------------------------------------------------------------ refusals, one at a time


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            f"name: {'n' * (MAX_NAME_LENGTH + 1)}\n",
            f"name: name is {MAX_NAME_LENGTH + 1} characters long; at most {MAX_NAME_LENGTH}",
        ),
        (f"name: {'n' * 300}\n", "it names the search's folder NAME-YYYYmmdd-HHMMSS"),
        (f"name: x\nseeds: [0, {MAX_SEED + 1}]\n", f"seeds: a list of different seeds from 0 to {MAX_SEED}"),
        ("name: x\nseeds: [-1]\n", f"seeds: a list of different seeds from 0 to {MAX_SEED}"),
        ("name: x\nseeds: [0, true]\n", "seeds: Input should be a whole number, not true or false"),
        (f"name: x\nfixed: {{seed: {2**64}}}\n", f"fixed.seed: a seed goes from 0 to {MAX_SEED}"),
        (f"name: x\ngrid: {{seed: [0, {MAX_SEED + 1}]}}\n", f"grid.seed[1]: a seed goes from 0 to {MAX_SEED}"),
        (
            f"name: x\nsample: {{seed: {{int: [0, {2**40}]}}}}\nsearch: {{algorithm: random}}\n",
            f"sample.seed.int[1]: a seed goes from 0 to {MAX_SEED}",
        ),
        (
            f"name: x\nsearch: {{sampler_seed: {MAX_SEED + 1}}}\n",
            f"search.sampler_seed: Input should be less than or equal to {MAX_SEED}",
        ),
        ("name: x\nfixed: {epochs: true}\n", "fixed.epochs: Input should be a whole number, not true or false"),
        ("name: x\nfixed: {lr: false}\n", "fixed.lr: Input should be a number, not true or false"),
        ("name: x\nfixed: {eval_eps: [0.1, true]}\n", "fixed.eval_eps: Input should be a number, not true or false"),
        ("name: x\ngrid: {epochs: [2, true]}\n", "grid.epochs[1]: Input should be a whole number, not true or false"),
        (
            "name: x\nsample: {epochs: {int: [true, 3]}}\nsearch: {algorithm: random}\n",
            "sample.epochs.int: Input should be a whole number, not true or false",
        ),
        (
            "name: x\nsearch: {num_samples: true}\n",
            "search.num_samples: Input should be a whole number, not true or false",
        ),
        (
            "name: x\nsearch: {scheduler: {type: asha, grace_period: true}}\n",
            "search.scheduler.grace_period: Input should be a whole",
        ),
        ("name: x\nresources: {cpu: true}\n", "resources.cpu: Input should be a number, not true or false"),
        ("name: x\nmax_failures: false\n", "max_failures: Input should be a whole number, not true or false"),
        ("name: x\ncheckpoint: {keep: true}\n", "checkpoint.keep: Input should be a whole number, not true or false"),
        (
            "name: x\nsearch: {algorithm: optuna, storage: 'not a url'}\n",
            "search.storage: SQLAlchemy cannot read this as a database URL",
        ),
        (
            "name: x\nsearch: {algorithm: optuna, storage: 'nosuchdb://h/x'}\n",
            "search.storage: SQLAlchemy knows no database kind 'nosuchdb'",
        ),
        (
            "name: x\nsearch: {algorithm: optuna, storage: 'postgresql+nosuchdriver://h/x'}\n",
            "search.storage: SQLAlchemy knows no database kind",
        ),
        (
            "name: x\nsearch: {algorithm: optuna, storage: 'sqlite:////no/such/folder/optuna.db'}\n",
            "search.storage: the folder '/no/such/folder' of the SQLite file does not exist",
        ),
    ],
)
def test_what_would_fail_in_the_search_is_refused_with_key_path_and_reason(tmp_path, text, expected):
    assert expected in refusal(tmp_path, text)


def test_a_missing_driver_is_refused_without_quoting_the_url(tmp_path, monkeypatch):
    import sqlalchemy.dialects.sqlite.pysqlite as pysqlite

    def missing() -> None:
        raise ModuleNotFoundError("No module named 'sqlite3'", name="sqlite3")

    monkeypatch.setattr(pysqlite.SQLiteDialect_pysqlite, "import_dbapi", classmethod(lambda cls: missing()))
    message = refusal(tmp_path, "name: x\nsearch: {algorithm: optuna, storage: 'sqlite:///opt.db?secret=s3cr3t'}\n")
    assert "search.storage: the driver of 'sqlite' is not installed here (no module 'sqlite3')" in message
    assert "s3cr3t" not in message


def test_true_and_too_large_seeds_from_the_command_line_are_refused(tmp_path):
    path = write(tmp_path, "name: x\nfixed: {epochs: 2}\n")
    assert "search.num_samples: Input should be a whole number" in refusal(
        tmp_path, path.read_text(), "num_samples=true"
    )
    assert f"fixed.seed: a seed goes from 0 to {MAX_SEED}" in refusal(
        tmp_path, path.read_text(), f"seed={MAX_SEED + 1}"
    )
    space, _ = load_space(str(path), ["epochs=3", f"seed={MAX_SEED}"])  # numbers on the command line stay numbers
    assert space.fixed["epochs"] == 3 and space.fixed["seed"] == MAX_SEED


def test_a_stage_name_too_long_for_a_folder_is_refused(tmp_path):
    long = "s" * (MAX_NAME_LENGTH + 1)
    message = refusal(tmp_path, f"name: x\nstages:\n  {long}:\n    grid: {{norm: [batchnorm]}}\n")
    assert f"stages: stage name '{long[:77]}..." in message and f"at most {MAX_NAME_LENGTH}" in message


# ------------------------------------------------------------------ init_from files


def test_an_init_from_file_that_does_not_exist_is_refused_where_it_is_named(tmp_path):
    message = refusal(
        tmp_path,
        f"""
        name: x
        fixed: {{regime: bn_finetune_adv, init_from: {tmp_path / "nope.pt"}}}
    """,
    )
    assert f"fixed.init_from: no such file '{tmp_path / 'nope.pt'}'; init_from names the checkpoint file" in message
    (tmp_path / "real.pt").write_bytes(b"")
    message = refusal(
        tmp_path,
        f"""
        name: x
        fixed: {{regime: bn_finetune_adv}}
        grid: {{init_from: [{tmp_path / "real.pt"}, {tmp_path / "gone.pt"}, {tmp_path}]}}
    """,
    )
    assert "grid.init_from[0]" not in message
    assert f"grid.init_from[1]: no such file '{tmp_path / 'gone.pt'}'" in message
    assert f"grid.init_from[2]: '{tmp_path}' is a folder, not a checkpoint file" in message


def test_an_init_from_file_in_a_stage_is_checked_and_a_stage_name_there_is_explained(tmp_path):
    message = refusal(
        tmp_path,
        """
        name: x
        fixed: {dataset: digits, epochs: 1}
        stages:
          pretrain:
            grid: {norm: [batchnorm]}
          finetune:
            fixed: {regime: bn_finetune_adv, init_from: pretrain}
            grid: {norm: [batchnorm]}
    """,
    )
    assert (
        "stages.finetune.fixed.init_from: no such file 'pretrain'; init_from names the checkpoint file a trial "
        "starts from (to start from stage pretrain's trials, give that stage init_from: pretrain)"
    ) in message


def test_an_existing_relative_init_from_is_made_absolute_and_a_later_stage_checkpoint_is_not_checked(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt.pt").write_bytes(b"")
    space, _ = load_space(str(write(tmp_path, "name: x\nfixed: {regime: bn_finetune_adv, init_from: ckpt.pt}\n")))
    assert space.fixed["init_from"] == str(tmp_path / "ckpt.pt")  # trials run in folders of their own
    staged, _ = load_space(str(write(tmp_path, STAGED.format(init_from="pretrain"))))  # produced by pretrain
    assert staged.stages["finetune"].init_from.stage == "pretrain"


# ------------------------------------------------------------------ the real commands


HOSTILE_STRUCTURE = f"""
name: {"n" * 300}
seeds: [0, {MAX_SEED + 1}]
search: {{algorithm: optuna, num_samples: true, storage: 'not a url', scheduler: hyperband}}
resources: {{cpu: true}}
"""
HOSTILE_VALUES = """
name: x
fixed: {{epochs: true, regime: bn_finetune_adv, init_from: {missing}}}
grid: {{seed: [0, 99999999999]}}
"""


@pytest.mark.parametrize("command", ["validate", "submit"])
def test_validate_and_submit_refuse_every_such_problem_with_exit_2(tmp_path, command):
    structure = write(tmp_path, HOSTILE_STRUCTURE, "structure.yaml")
    values = write(tmp_path, HOSTILE_VALUES.format(missing=tmp_path / "nope.pt"), "values.yaml")
    expected = {
        structure: [
            "name: name is 300 characters long; at most 100",
            f"seeds: a list of different seeds from 0 to {MAX_SEED}",
            "search.num_samples: Input should be a whole number, not true or false",
            "search.storage: SQLAlchemy cannot read this as a database URL",
            "search.scheduler.type: allowed: 'fifo' or 'asha'",
            "resources.cpu: Input should be a number, not true or false",
        ],
        values: [
            "fixed.epochs: Input should be a whole number, not true or false",
            f"fixed.init_from: no such file '{tmp_path / 'nope.pt'}'",
            f"grid.seed[1]: a seed goes from 0 to {MAX_SEED}",
        ],
    }
    for path, needles in expected.items():
        proc = run_normlab(command, str(path), cwd=tmp_path, timeout=120)
        err = proc.stderr
        assert proc.returncode == 2, err
        assert "Traceback" not in err and not (tmp_path / "normlab_runs").exists()
        lines = [line for line in err.splitlines() if line.startswith(f"{path}: ")]
        for needle in needles:
            assert any(f"{path}: {needle}" in line for line in lines), (needle, err)


def test_validate_accepts_the_scheduler_form_readme_suggests(tmp_path):
    path = write(tmp_path, "name: x\nfixed: {epochs: 2}\nsearch: {scheduler: fifo}\n")
    proc = run_normlab("validate", str(path), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0 and "scheduler fifo" in proc.stdout, proc.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["ui", "--port", "99999"], "Invalid value for '--port': 99999 is not in the range 1<=x<=65535"),
        (["ui", "--port", "0"], "Invalid value for '--port': 0 is not in the range 1<=x<=65535"),
        (["ui", "--workers", "0"], "Invalid value for '--workers': 0 is not in the range x>=1"),
        (["submit", "quickstart", "--num-cpus", "0"], "Invalid value for '--num-cpus': 0 is not in the range x>=1"),
        (["resume", "somewhere", "--num-cpus", "-2"], "Invalid value for '--num-cpus': -2 is not in the range x>=1"),
    ],
)
def test_out_of_range_numeric_options_are_usage_errors(tmp_path, args, expected):
    proc = run_normlab(*args, cwd=tmp_path, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "normlab_runs").exists()


def test_trial_refuses_a_checkpoint_dir_or_json_out_it_cannot_write_before_training(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    proc = run_normlab("trial", "epochs=1", "--checkpoint-dir", str(blocker / "ckpt"), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"--checkpoint-dir {blocker / 'ckpt'}: cannot write in the folder" in " ".join(proc.stderr.split())
    assert "epoch 1/1" not in proc.stdout
    proc = run_normlab("trial", "epochs=1", "--json-out", str(blocker / "result.json"), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert (
        f"--json-out {blocker / 'result.json'}: cannot write in the folder {blocker} (a file is in the way)"
        in " ".join(proc.stderr.split())
    )
    assert "epoch 1/1" not in proc.stdout


def test_trial_refuses_true_for_a_number_and_a_seed_numpy_cannot_take(tmp_path):
    proc = run_normlab("trial", "epochs=true", f"seed={MAX_SEED + 1}", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    err = " ".join(proc.stderr.split())
    assert "command line: epochs: Input should be a whole number, not true or false" in err
    assert f"command line: seed: a seed goes from 0 to {MAX_SEED}" in err
