"""Validation beyond a search file's structure: unknown knobs, sizes, bad values, impossible combinations.

``semantic_problems`` checks a one-stage space against ``TrialConfig`` (every fixed value,
every grid value, both bounds or every choice of a sampled key, conditions) and the grid's
size before anything is built; ``init_from_problems`` the checkpoint files a file names.
Every problem is a ``(key path, reason)`` pair; ``load.load_space`` reports them all at once.
"""

from __future__ import annotations

import difflib
import itertools
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from orchestrator.searchfile.space import (
    MAX_GRID_COMBINATIONS,
    MAX_TRIALS,
    MAX_VALIDATED_COMBINATIONS,
    SearchSpace,
    Stage,
)
from trainables.config import TrialConfig, format_validation_error, is_integer_knob
from trainables.problems import MAX_PROBLEMS, Problem, short_repr


def _field_problems(values: dict[str, Any], keys: list[str]) -> dict[str, str]:
    """Problems TrialConfig finds with ``keys`` of ``values`` (other fields' problems ignored)."""
    try:
        TrialConfig.model_validate(values)
    except ValidationError as err:
        out: dict[str, str] = {}
        for e in err.errors():
            if e["loc"] and e["loc"][0] in keys:
                line = format_validation_error(ValidationError.from_exception_data(err.title, [e]))
                out.setdefault(str(e["loc"][0]), line.split(": ", 1)[1] if ": " in line else line)
        return out
    return {}


def _unknown_key(key: str, hint: bool = True) -> str:
    """An unknown knob, with the closest names (``hint``: they cost a string comparison per knob)."""
    close = difflib.get_close_matches(key, list(TrialConfig.model_fields), n=3) if hint else []
    hint_text = f"; did you mean {', '.join(close)}?" if close else ""
    return f"{short_repr(key)} is not a trial knob{hint_text} (`normlab trial --help` lists them all)"


def _grid_size(count: int | None) -> str:
    if count is None:
        return f"more than {MAX_GRID_COMBINATIONS:,}"
    return f"{count:,}" if count < 10**15 else f"about 10^{int(math.log10(count))}"


def size_problems(space: SearchSpace) -> list[Problem]:
    """A grid over ``MAX_GRID_COMBINATIONS`` combinations or a search over ``MAX_TRIALS`` trials."""
    if space.search.algorithm == "optuna":
        if space.search.num_samples > MAX_TRIALS:
            return [("search.num_samples", f"{space.search.num_samples:,} trials; at most {MAX_TRIALS:,}")]
        return []
    count = space.combination_count()
    if count is None or count > MAX_GRID_COMBINATIONS:
        reason = (
            f"{_grid_size(count)} combinations of grid values; at most {MAX_GRID_COMBINATIONS:,} "
            "(list fewer values, add when: conditions, or sample keys with algorithm random or optuna)"
        )
        return [("grid", reason)]
    trials = count * space.search.num_samples
    if trials > MAX_TRIALS:
        reason = f"{trials:,} trials ({count:,} grid combinations x {space.search.num_samples:,} samples); at most {MAX_TRIALS:,}"
        return [("search.num_samples", reason)]
    return []


def semantic_problems(space: SearchSpace) -> list[Problem]:
    """Problems beyond the file's structure: unknown knobs, sizes, bad values, impossible combinations."""
    problems: list[Problem] = []
    known = set(TrialConfig.model_fields)
    sections = {"fixed": list(space.fixed), "grid": list(space.grid), "sample": list(space.sample)}
    seen: dict[str, str] = {}
    for section, keys in sections.items():
        for key in keys:
            if key not in known:
                problems.append((f"{section}.{key}", _unknown_key(key, hint=len(problems) < MAX_PROBLEMS)))
            elif key in seen:
                problems.append((f"{section}.{key}", f"also set in {seen[key]}: a key belongs to one section"))
            seen.setdefault(key, section)
    if all(key in known for key in space.grid):  # at most one grid key per knob: counting is quick
        too_big = size_problems(space)
        if too_big:
            return too_big + problems
    fixed = {k: v for k, v in space.fixed.items() if k in known}
    grid = {k: v for k, v in space.grid.items() if k in known}
    sample = {k: v for k, v in space.sample.items() if k in known}

    fixed_problems = _field_problems(fixed, list(fixed))
    problems += [(f"fixed.{k}", msg) for k, msg in fixed_problems.items()]
    base = {k: v for k, v in fixed.items() if k not in fixed_problems}

    def check_value(path: str, key: str, value: Any) -> None:
        found = _field_problems({**base, key: value}, [key])
        if key in found:
            problems.append((path, found[key]))

    for key, spec in grid.items():
        for i, value in enumerate(spec.values):
            check_value(f"grid.{key}[{i}]", key, value)
    for key, spec in sample.items():
        if spec.kind in ("uniform", "loguniform") and is_integer_knob(key):
            problems.append(
                (
                    f"sample.{key}.{spec.kind}",
                    f"draws fractional numbers, but {key} is a whole number: use int: [low, high]",
                )
            )
            continue
        for i, value in enumerate(spec.probe_values()):
            check_value(f"sample.{key}.{spec.kind}[{i}]", key, value)
    for section, specs in (("grid", grid), ("sample", sample)):
        for key, spec in specs.items():
            for cond_key, allowed in spec.when.items():
                path = f"{section}.{key}.when.{cond_key}"
                if cond_key not in known:
                    problems.append((path, _unknown_key(cond_key, hint=len(problems) < MAX_PROBLEMS)))
                elif cond_key in space.sample:
                    problems.append((path, "a condition can only test fixed or grid keys, not sampled ones"))
                elif cond_key == key:
                    problems.append((path, "a key cannot depend on itself"))
                else:
                    for i, value in enumerate(allowed):
                        check_value(f"{path}[{i}]", cond_key, value)
    if space.search.algorithm == "grid" and space.sample:
        problems.append(
            ("search.algorithm", "sampled keys need algorithm 'random' or 'optuna' (grid enumerates only grid keys)")
        )
    if problems:
        return problems
    return _combination_problems(space, base)


def _trial_key_holders(space: SearchSpace) -> Iterator[tuple[str, Stage | SearchSpace]]:
    """The top level and each stage, with the prefix of their key paths."""
    yield "", space
    for name, stage in space.stages.items():
        yield f"stages.{name}.", stage


def init_from_problems(space: SearchSpace) -> list[Problem]:
    """Every ``init_from`` checkpoint a file names (in fixed, grid or sample choices, of the search
    and its stages) must be an existing file: refused here rather than when its trials start. A
    relative path is made absolute (trials run in folders of their own); URIs (``s3://``) are
    read where the trials run and are not checked. A stage's ``init_from: STAGE`` is a later
    checkpoint, not a file: ``stages`` checks it."""
    problems: list[Problem] = []
    stages = set(space.stages)

    def check(path: str, value: Any) -> Any:
        if not isinstance(value, str) or "://" in value or value.lower() in ("", "none", "null", "~"):
            return value  # TrialConfig reports a non-string; None means no checkpoint
        try:
            file = Path(value).expanduser()
            exists, is_file = file.exists(), file.is_file()
            absolute = os.path.abspath(file)
        except (OSError, ValueError, RuntimeError) as exc:  # NUL byte, name too long, unknown ~user
            problems.append((path, f"not a usable path ({exc})"))
            return value
        if not is_file:
            reason = (
                f"{short_repr(value)} is a folder, not a checkpoint file"
                if exists
                else f"no such file {short_repr(value)}; init_from names the checkpoint file a trial starts from"
            )
            if value in stages:
                reason += f" (to start from stage {value}'s trials, give that stage init_from: {value})"
            problems.append((path, reason))
            return value
        return absolute if absolute != value else value

    for prefix, holder in _trial_key_holders(space):
        if "init_from" in holder.fixed:
            holder.fixed["init_from"] = check(f"{prefix}fixed.init_from", holder.fixed["init_from"])
        if "init_from" in holder.grid:
            values = holder.grid["init_from"].values
            values[:] = [check(f"{prefix}grid.init_from[{i}]", v) for i, v in enumerate(values)]
        sample = holder.sample.get("init_from")
        if sample is not None and sample.choice is not None:
            sample.choice[:] = [check(f"{prefix}sample.init_from.choice[{i}]", v) for i, v in enumerate(sample.choice)]
    return problems


def _combination_problems(space: SearchSpace, base: dict[str, Any]) -> list[Problem]:
    """Whole trial configurations, so cross-field rules (e.g. regime needs init_from) are checked."""
    problems: list[Problem] = []
    combos = itertools.islice(space.iter_grid_combinations(), MAX_VALIDATED_COMBINATIONS)
    probe = {k: s.probe_values()[0] for k, s in space.sample.items() if not s.when}
    for i, combo in enumerate(combos):
        values = {**base, **probe, **combo}
        try:
            cfg = TrialConfig.model_validate(values)
        except ValidationError as err:
            label = (
                ", ".join(f"{k}={v if isinstance(v, str) else short_repr(v)}" for k, v in combo.items()) or "fixed keys"
            )
            detail = format_validation_error(err).replace("(config): ", "").replace("\n", "; ")
            problems.append((f"grid combination {i + 1} ({label})", detail))
            if len(problems) >= 5:
                problems.append(("", f"(further combinations not listed; {space.combination_count()} in all)"))
                break
            continue
        if (
            space.search.scheduler.type == "asha"
            and (space.search.scheduler.max_t or cfg.epochs) < space.search.scheduler.grace_period
        ):
            problems.append(("search.scheduler.grace_period", f"larger than max_t / epochs ({cfg.epochs})"))
            break
    return problems
