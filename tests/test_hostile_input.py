"""Hostile input: whatever a search-space file, a --config file, a KEY=VALUE argument or a
checkpoint holds, normlab answers with one short message, fast, and never a traceback.

The rule for search-space files (``assert_rule``): ``load_space`` either returns a valid
space or raises ``SpaceError`` whose message has fewer than 20 lines, each starting with
the file's path, and takes under 2 s either way. Hypothesis generates valid files from
the real knob names and registry values, and hostile ones: random bytes and text, wrong
encodings, alias bombs, deep nesting, duplicate keys, huge grids, non-finite numbers,
float distributions for integer knobs, random structures. A few real subprocesses check
exit code 2, no traceback, and the time beyond the interpreter's start-up.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.searchfile.load import load_space
from orchestrator.searchfile.space import MAX_GRID_COMBINATIONS, GridKey, SearchSpace, SpaceError
from trainables.attacks import ATTACKS
from trainables.config import TrialConfig, parse_overrides
from trainables.models import MODELS
from trainables.norms import NORMS
from trainables.optim import OPTIMIZERS
from trainables.safe_yaml import MAX_DEPTH, MAX_NODES, YamlRefused, load_yaml_text
from trainables.trial import CHECKPOINT_FORMAT, InvalidCheckpointError, validate_checkpoint_state

SECONDS = 2.0
MAX_LINES = 20
EXAMPLES = settings(
    max_examples=25,
    deadline=None,
    database=None,
    derandomize=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# ------------------------------------------------------------------ the rule


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hostile")


def assert_rule(path: Path) -> SearchSpace | SpaceError:
    """``load_space(path)``: a valid space, or a short SpaceError naming the file; under 2 s."""
    start = time.perf_counter()
    try:
        result: SearchSpace | SpaceError = load_space(str(path))[0]
    except SpaceError as exc:
        result = exc
    elapsed = time.perf_counter() - start
    assert elapsed < SECONDS, f"validation took {elapsed:.2f} s"
    if isinstance(result, SpaceError):
        lines = str(result).splitlines()
        assert 0 < len(lines) < MAX_LINES, str(result)
        assert all(line.startswith(f"{path}: ") for line in lines), str(result)
    else:
        assert result.trial_count() == result.search.num_samples * len(result.grid_combinations())
    return result


def refused(path: Path, needle: str) -> str:
    result = assert_rule(path)
    assert isinstance(result, SpaceError), f"{path} was accepted"
    assert needle in str(result), str(result)
    return str(result)


def write(folder: Path, data: str | bytes, name: str = "space.yaml") -> Path:
    path = folder / name
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


# ------------------------------------------------------------------ valid files

FLOATS = {"lr": (1e-4, 1.0), "norm_power": (0.05, 2.0), "train_eps": (0.0, 1.0), "weight_decay": (0.0, 0.01)}
INTS = {"epochs": (1, 50), "batch_size": (2, 512), "seed": (0, 10_000), "train_steps": (1, 20), "eval_steps": (1, 20)}
VALUES: dict[str, st.SearchStrategy[Any]] = {
    "norm": st.sampled_from(NORMS.names()),
    "model": st.sampled_from(MODELS.names()),
    "dataset": st.sampled_from(["digits", "synthetic"]),
    "regime": st.sampled_from(["standard", "pgd_at", "fgsm_at", "trades"]),
    "optimizer": st.sampled_from(OPTIMIZERS.names()),
    "lr_schedule": st.sampled_from(["constant", "cosine", "linear"]),
    "eval_attacks": st.lists(st.sampled_from(ATTACKS.names()), min_size=1, max_size=3, unique=True),
    "norm_affine": st.booleans(),
    **{k: st.floats(lo, hi, allow_nan=False) for k, (lo, hi) in FLOATS.items()},
    **{k: st.integers(lo, hi) for k, (lo, hi) in INTS.items()},
}


@st.composite
def valid_spaces(draw: st.DrawFn) -> dict[str, Any]:
    """A search space every part of which TrialConfig accepts, conditions included."""
    knobs = draw(st.permutations(sorted(VALUES)))
    n_fixed, n_grid = draw(st.integers(0, 4)), draw(st.integers(0, 4))
    fixed_keys, grid_keys = knobs[:n_fixed], knobs[n_fixed : n_fixed + n_grid]
    sample_keys = [k for k in knobs[n_fixed + n_grid :] if k in FLOATS or k in INTS][: draw(st.integers(0, 2))]
    space: dict[str, Any] = {
        "name": "valid",
        "fixed": {k: draw(VALUES[k]) for k in fixed_keys},
        "grid": {},
        "sample": {},
    }
    for key in grid_keys:
        values = draw(st.lists(VALUES[key], min_size=1, max_size=3))
        testable = [k for k in (*fixed_keys, *grid_keys) if k != key]
        if testable and draw(st.booleans()):  # a condition on a fixed key or an earlier or later grid key
            tested = draw(st.sampled_from(testable))
            space["grid"][key] = {
                "values": values,
                "when": {tested: draw(st.lists(VALUES[tested], min_size=1, max_size=2))},
            }
        else:
            space["grid"][key] = values
    for key in sample_keys:
        if key in INTS:
            low = draw(st.integers(*INTS[key]))
            space["sample"][key] = {"int": [low, draw(st.integers(low + 1, INTS[key][1] + 1))]}
        else:
            lo, hi = FLOATS[key]
            a, b = sorted(draw(st.lists(st.floats(max(lo, 1e-4), hi), min_size=2, max_size=2, unique=True)))
            space["sample"][key] = {draw(st.sampled_from(["uniform", "loguniform"])): [a, b]}
    space["search"] = {
        "algorithm": "random" if sample_keys else draw(st.sampled_from(["grid", "random"])),
        "num_samples": draw(st.integers(1, 5)),
    }
    return space


@EXAMPLES
@given(space=valid_spaces())
def test_valid_files_load_and_count_their_trials(folder, space):
    result = assert_rule(write(folder, yaml.safe_dump(space, sort_keys=False)))
    assert isinstance(result, SearchSpace), str(result)
    assert result.trial_count() == space["search"]["num_samples"] * len(result.grid_combinations())


# ------------------------------------------------------------------ counting without building

POOL = ["norm", "model", "epochs", "seed", "not_a_knob"]
SMALL = st.sampled_from([0, 1, 2, "a", "b", True, None])


@st.composite
def conditional_grids(draw: st.DrawFn) -> SearchSpace:
    """Grids whose conditions test earlier, later, fixed, unchosen, unknown and their own keys."""
    keys = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=5, unique=True))
    grid = {}
    for key in keys:
        when = draw(st.dictionaries(st.sampled_from(POOL), st.lists(SMALL, min_size=1, max_size=3), max_size=2))
        grid[key] = GridKey(values=draw(st.lists(SMALL, min_size=1, max_size=4)), when=when)
    fixed = draw(st.dictionaries(st.sampled_from([k for k in POOL if k not in keys] or ["lr"]), SMALL, max_size=2))
    return SearchSpace(name="count", grid=grid, fixed=fixed)


@settings(max_examples=150, deadline=None, database=None)
@given(space=conditional_grids())
def test_counting_agrees_with_building(space):
    built = len(space.grid_combinations())
    assert space.combination_count(limit=10**6) == built
    assert space.combination_count(limit=built) == built
    if built > 1:  # over the limit: None, or a count above it
        assert space.combination_count(limit=0) in (None, built)


# nine whole-number knobs with ten values each: a grid of 10**9 combinations
BILLION_GRID_KEYS = (
    "epochs",
    "seed",
    "train_steps",
    "eval_steps",
    "cw_steps",
    "square_queries",
    "norm_groups",
    "batch_size",
    "eval_batch_size",
)


def test_a_billion_combinations_are_counted_not_built():
    grid = {k: GridKey(values=list(range(1, 11))) for k in BILLION_GRID_KEYS}
    space = SearchSpace(name="huge", grid=grid)
    start = time.perf_counter()
    assert space.combination_count() == 10**9
    assert time.perf_counter() - start < 0.1


# ------------------------------------------------------------------ hostile files

GOOD_TEXT = (
    "name: tiny\ndescription: café tests\nfixed: {dataset: digits, epochs: 2}\ngrid:\n  norm: [batchnorm, robustnorm]\n"
)


@EXAMPLES
@given(data=st.binary(max_size=4000))
def test_random_bytes(folder, data):
    assert_rule(write(folder, data))


@EXAMPLES
@given(text=st.text(max_size=2000))
def test_random_text(folder, text):
    assert_rule(write(folder, text))


@EXAMPLES
@given(position=st.integers(0, len(GOOD_TEXT)), junk=st.text(min_size=1, max_size=20))
def test_valid_file_with_junk_inserted(folder, position, junk):
    assert_rule(write(folder, GOOD_TEXT[:position] + junk + GOOD_TEXT[position:]))


@EXAMPLES
@given(
    encoding=st.sampled_from(
        ["latin-1", "cp1252", "utf-16-le", "utf-16-be", "utf-32-le", "utf-16", "utf-32", "utf-8-sig"]
    )
)
def test_encodings(folder, encoding):
    result = assert_rule(write(folder, GOOD_TEXT.encode(encoding)))
    if encoding in ("utf-16", "utf-32", "utf-8-sig"):  # with a byte-order mark: read
        assert isinstance(result, SearchSpace) and result.description == "café tests"
    else:
        assert isinstance(result, SpaceError) and "save the file as UTF-8" in str(result)
        assert "byte offset" in str(result)


@EXAMPLES
@given(
    width=st.integers(2, 12),
    depth=st.integers(2, 12),
    merge=st.booleans(),
    section=st.sampled_from(["fixed", "grid", "description"]),
)
def test_alias_bombs(folder, width, depth, merge, section):
    lines = ["name: bomb", f"{section}:", "  l0: &l0 {x: 1}" if merge else "  l0: &l0 [x]"]
    for i in range(1, depth + 1):
        refs = ", ".join([f"*l{i - 1}"] * width)
        lines.append(f"  l{i}: &l{i} {{<<: [{refs}]}}" if merge else f"  l{i}: &l{i} [{refs}]")
    path = write(folder, "\n".join(lines) + "\n")
    if width**depth > MAX_NODES:
        refused(path, "aliases expand to more than")
    else:
        assert_rule(path)


@EXAMPLES
@given(
    depth=st.integers(MAX_DEPTH + 1, 30_000), style=st.sampled_from(["[", "{a: ", "mapping block", "sequence block"])
)
def test_deep_nesting(folder, depth, style):
    if style.endswith("block"):  # indentation costs ~depth^2 bytes: stay under the size limit
        item = "k:" if style == "mapping block" else "-"
        body = "".join("  " * (i + 1) + item + "\n" for i in range(min(depth, 500)))
        text = "name: deep\nfixed:\n  x:\n" + body
    else:
        text = "name: deep\nfixed:\n  x: " + style * depth + ("]" if style == "[" else "}") * depth + "\n"
    refused(write(folder, text), "nest")


@EXAMPLES
@given(section=st.sampled_from(["top", "fixed", "grid", "search"]), key=st.sampled_from(["epochs", "norm", "lr"]))
def test_duplicate_keys(folder, section, key):
    texts = {
        "top": f"name: dup\nfixed: {{{key}: 1}}\nfixed: {{{key}: 2}}\n",
        "fixed": f"name: dup\nfixed:\n  {key}: 1\n  {key}: 2\n",
        "grid": f"name: dup\ngrid:\n  {key}: [1]\n  seed: [1, 2]\n  {key}: [2]\n",
        "search": "name: dup\nsearch:\n  num_samples: 1\n  num_samples: 2\n",
    }
    first, second = {"top": (2, 3), "fixed": (3, 4), "grid": (3, 5), "search": (3, 4)}[section]
    refused(write(folder, texts[section]), f"duplicate key (lines {first} and {second})")


@EXAMPLES
@given(n_keys=st.integers(2, 9), n_values=st.integers(2, 60), samples=st.integers(1, 10**6))
def test_huge_grids(folder, n_keys, n_values, samples):
    keys = (
        list(INTS)[:n_keys]
        + ["cw_steps", "square_queries", "norm_groups", "eval_batch_size"][: max(0, n_keys - len(INTS))]
    )
    grid = {k: list(range(2, 2 + n_values)) for k in keys}
    path = write(folder, yaml.safe_dump({"name": "big", "grid": grid, "search": {"num_samples": samples}}))
    combos = n_values ** len(keys)
    if combos > MAX_GRID_COMBINATIONS:
        refused(path, "combinations of grid values; at most 10,000")
    elif combos * samples > 100_000:
        refused(
            path, f"{combos * samples:,} trials ({combos:,} grid combinations x {samples:,} samples); at most 100,000"
        )
    else:
        assert_rule(path)


NON_FINITE = st.sampled_from([".inf", "-.inf", ".NaN", "!!float inf", "1.0e+400", "-1.5e999"])


@EXAMPLES
@given(value=NON_FINITE, where=st.sampled_from(["fixed.lr", "grid.lr", "sample.lr", "when", "resources.cpu"]))
def test_non_finite_numbers(folder, value, where):
    texts = {
        "fixed.lr": f"name: x\nfixed: {{lr: {value}}}\n",
        "grid.lr": f"name: x\ngrid: {{lr: [0.1, {value}]}}\n",
        "sample.lr": f"name: x\nsample: {{lr: {{uniform: [0.1, {value}]}}}}\nsearch: {{algorithm: random}}\n",
        "when": f"name: x\ngrid: {{lr: [0.1], norm_power: {{values: [0.2], when: {{lr: [{value}]}}}}}}\n",
        "resources.cpu": f"name: x\nresources: {{cpu: {value}}}\n",
    }
    refused(
        write(folder, texts[where]), "finite number"
    )  # YAML: "non-finite number"; strings: pydantic's "should be a finite number"


def test_non_finite_values_from_the_command_line_are_refused(folder):
    path = write(folder, GOOD_TEXT)
    with pytest.raises(SpaceError, match="command line: lr: non-finite number .inf"):
        load_space(str(path), ["lr=.inf"])
    with pytest.raises(SpaceError, match="fixed.lr: Input should be a finite number"):
        load_space(str(path), ["lr=inf"])  # a string that pydantic would read as infinity
    with pytest.raises(SpaceError, match=r"command line: epochs\[0\]\[0\].*: nested deeper than 32 levels"):
        load_space(str(path), ["epochs=" + "[" * 100 + "]" * 100])


@EXAMPLES
@given(key=st.sampled_from(sorted(INTS)), kind=st.sampled_from(["uniform", "loguniform"]))
def test_float_distributions_for_integer_knobs(folder, key, kind):
    path = write(folder, f"name: x\nsample: {{{key}: {{{kind}: [2, 8]}}}}\nsearch: {{algorithm: random}}\n")
    refused(path, f"sample.{key}.{kind}: draws fractional numbers, but {key} is a whole number: use int: [low, high]")


LEAVES = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=30), st.binary(max_size=10))
STRUCTURES = st.recursive(
    LEAVES,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=40,
)


@EXAMPLES
@given(
    section=st.sampled_from(["fixed", "grid", "sample", "search", "resources", "checkpoint", "name", "top"]),
    value=STRUCTURES,
)
def test_random_structures(folder, section, value):
    space: dict[str, Any] = {"name": "random"}
    if section == "top":
        space = value  # type: ignore[assignment]
    else:
        space[section] = value
    assert_rule(write(folder, yaml.safe_dump(space, allow_unicode=True)))


@EXAMPLES
@given(n=st.integers(16, 3000))
def test_many_problems_are_capped(folder, n):
    path = write(folder, "name: x\nfixed:\n" + "".join(f"  knob{i}: 1\n" for i in range(n)))
    message = refused(path, f"... and {n - 15} more")
    assert "fixed.knob0: 'knob0' is not a trial knob" in message


def test_oversized_and_unreadable_files(folder):
    refused(write(folder, "name: x\n" + "#" * (2 << 20)), "file is 2,097,160 bytes; the limit is 1,048,576")
    refused(write(folder, "name: x\nfixed: {epochs: " + "9" * 5000 + "}\n"), "fixed.epochs: cannot read")
    refused(write(folder, "name: x\nfixed: {norm: " + "x" * 500_000 + "}\n"), "unknown norm 'xxxxxxxx")
    refused(write(folder, "a: &a [1, *a]\n"), "alias *a refers to a node that contains it")
    big = refused(
        write(folder, "name: x\nfixed: {epochs: [" + ", ".join(["1"] * 25_000) + "]}\n"), "more than 20,000 YAML items"
    )
    assert len(big) < 300


# ------------------------------------------------------------------ the YAML reader and KEY=VALUE


def test_reader_keeps_safe_load_semantics():
    text = "base: &b {x: 1, y: [a, b]}\nother:\n  <<: *b\n  y: 3\nwhen: 2001-01-01\nyes: no\n"
    assert load_yaml_text(text, "f") == yaml.safe_load(text)
    with pytest.raises(YamlRefused, match="could not determine a constructor"):
        load_yaml_text("a: !!python/object/apply:os.system [ls]\n", "f")


def test_overrides_are_read_with_the_bounded_reader():
    assert parse_overrides(["epochs=3", "eval_eps=[0.1, 0.2]", "data_dir=a: b"]) == {
        "epochs": 3,
        "eval_eps": [0.1, 0.2],
        "data_dir": "a: b",
    }
    with pytest.raises(ValueError, match=r"eval_eps\[1\]: non-finite number \.nan"):
        parse_overrides(["eval_eps=[0.1, .nan]"])
    with pytest.raises(ValueError, match="norm: not UTF-8 text: an undecodable byte at character 1"):
        parse_overrides(["norm=x\udcff"])  # how Python passes on a command-line byte that is not UTF-8
    with pytest.raises(ValueError, match="aliases"):
        parse_overrides(["x=[&a [1,1,1,1,1,1,1,1,1,1], " + ", ".join(["*a"] * 100) + ", *a]"])


# ------------------------------------------------------------------ checkpoints


def test_checkpoint_structure_is_validated_in_one_place():
    good = {
        "format": CHECKPOINT_FORMAT,
        "epoch": 1,
        "model": {"w": torch.zeros(1)},
        "optimizer": {"state": {}, "param_groups": []},
        "scheduler": {},
        "rng": {"python": 0, "numpy": 0, "torch": 0},
        "config": TrialConfig(epochs=2).model_dump(mode="json"),
    }
    assert validate_checkpoint_state(good, "c.pt").epochs == 2
    with pytest.raises(InvalidCheckpointError) as info:
        validate_checkpoint_state({"format": CHECKPOINT_FORMAT, "model": {}}, "c.pt")
    assert str(info.value).splitlines() == [
        f"c.pt: {k}: missing" for k in ("epoch", "optimizer", "scheduler", "rng", "config")
    ]
    bad = {**good, "epoch": 5, "rng": {"python": 0}, "config": {**good["config"], "norm": "nrom"}, "history": {}}
    with pytest.raises(InvalidCheckpointError) as info:
        validate_checkpoint_state(bad, "c.pt")
    message = str(info.value)
    assert "c.pt: history: should be list, got dict" in message and "c.pt: rng.numpy: missing" in message
    assert "c.pt: config.norm: unknown norm 'nrom'" in message
    with pytest.raises(InvalidCheckpointError, match="epoch: 5 is outside 0..2"):
        validate_checkpoint_state({**good, "epoch": 5}, "c.pt")
    with pytest.raises(InvalidCheckpointError, match="c.pt: not a normlab checkpoint: a list"):
        validate_checkpoint_state([], "c.pt")


# ------------------------------------------------------------------ the real command line

NORMLAB = [sys.executable, "-m", "orchestrator.cli"]


def run_timed(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, float, float]:
    """``normlab ARGS``, with its wall time and CPU time (user + system of the child)."""
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run([*NORMLAB, *args], capture_output=True, text=True, cwd=cwd, timeout=120, check=False)
    wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_CHILDREN)
    return proc, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


@pytest.fixture(scope="module")
def baseline(folder: Path) -> tuple[float, float]:
    """Start-up cost: `normlab trial --help` imports what validate and trial import (torch,
    the registries); plain `normlab --help` imports neither, so it would not be a fair baseline."""
    runs = [run_timed("trial", "--help", cwd=folder) for _ in range(2)]
    assert all(proc.returncode == 0 for proc, _, _ in runs)
    return min(wall for _, wall, _ in runs), min(cpu for _, _, cpu in runs)


def bomb_text(top: str) -> str:
    return top + "".join(f"  l{i}: &l{i} [" + ", ".join([f"*l{i - 1}" if i else "x"] * 9) + "]\n" for i in range(9))


HOSTILE_FILES: dict[str, tuple[bytes, str]] = {
    "bomb": (bomb_text("name: bomb\nfixed:\n").encode(), "aliases expand to more than"),
    "deep": (("name: deep\nfixed: {x: " + "[" * 100_000 + "]" * 100_000 + "}\n").encode(), "nesting depth"),
    "latin1": ("name: x\ndescription: café\n".encode("latin-1"), "not UTF-8 (byte 0xe9 at byte offset 24"),
    "utf16": ("name: x\n".encode("utf-16-le"), "NUL byte at byte offset 1"),
    "grid": (
        yaml.safe_dump(
            {
                "name": "g",
                "grid": {k: list(range(1, 11)) for k in BILLION_GRID_KEYS},
            }
        ).encode(),
        "grid: 1,000,000,000 combinations of grid values; at most 10,000",
    ),
    "dup": (b"name: x\nfixed: {epochs: 2}\nfixed: {epochs: 3}\n", "fixed: duplicate key (lines 2 and 3)"),
}


def assert_refused(
    proc: subprocess.CompletedProcess, wall: float, cpu: float, baseline: tuple[float, float], needle: str
) -> None:
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) < MAX_LINES, proc.stderr
    assert needle in " ".join(proc.stderr.split()), proc.stderr
    # the work beyond start-up, measured as CPU time: on this shared machine a run's wall
    # time varies by seconds with the load, its CPU time does not
    assert cpu - baseline[1] < SECONDS, (
        f"cpu {cpu:.2f} s vs {baseline[1]:.2f} s; wall {wall:.2f} s vs {baseline[0]:.2f} s"
    )


@pytest.mark.parametrize("case", sorted(HOSTILE_FILES))
def test_validate_refuses_hostile_files(folder, baseline, case):
    data, needle = HOSTILE_FILES[case]
    path = write(folder, data, f"{case}.yaml")
    proc, wall, cpu = run_timed("validate", str(path), cwd=folder)
    assert_refused(proc, wall, cpu, baseline, needle)
    assert all(line.startswith(f"{path}: ") for line in proc.stderr.splitlines()[1:]), proc.stderr


@pytest.mark.parametrize("case", ["bomb", "utf16"])
def test_trial_config_refuses_hostile_files(folder, baseline, case):
    data = bomb_text("knobs:\n").encode() if case == "bomb" else "epochs: 2\n".encode("utf-16-le")
    path = write(folder, data, f"config_{case}.yaml")
    needle = "aliases expand to more than" if case == "bomb" else "save the file as UTF-8"
    assert_refused(*run_timed("trial", "--config", str(path), cwd=folder), baseline, needle)


def test_trial_resume_names_what_the_checkpoint_lacks(folder, baseline):
    (folder / "ckpt").mkdir()
    torch.save({"format": CHECKPOINT_FORMAT, "model": {}}, folder / "ckpt" / "last.pt")
    proc, wall, cpu = run_timed("trial", "epochs=1", "--checkpoint-dir", str(folder / "ckpt"), "--resume", cwd=folder)
    assert_refused(proc, wall, cpu, baseline, f"{folder / 'ckpt' / 'last.pt'}: config: missing")
    assert "epoch: missing" in proc.stderr


def test_resume_refuses_a_missing_path_or_a_file(folder):
    proc = subprocess.run(
        [*NORMLAB, "resume", str(folder / "nope")], capture_output=True, text=True, timeout=120, check=False
    )
    assert proc.returncode == 2 and "no such folder" in proc.stderr and "Traceback" not in proc.stderr
    file = write(folder, "x", "search.txt")
    proc = subprocess.run([*NORMLAB, "resume", str(file)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2 and "a file, not a folder" in proc.stderr and "Traceback" not in proc.stderr
