"""Partial search files merged over a file: a file's profiles, and the command line's overrides.

A search file may name profiles, each a partial search file::

    profiles:
      paper:
        fixed: {model: resnet20, epochs: 164, lr_schedule: step, lr_milestones: [80, 120]}
        resources: {gpu: 0.5}

``normlab submit FILE --profile paper`` merges one over the file (``load.load_space``);
``KEY=VALUE`` overrides are turned into such a partial file and merged the same way, after
the profile. ``merge_layer`` is the one place either is merged:

- mappings merge key by key, at any depth; anything else (a number, a string, a list)
  replaces the file's value. A shorthand of the file meets a mapping as the mapping it
  stands for: ``scheduler: fifo`` is ``{type: fifo}``, ``init_from: pretrain`` is
  ``{stage: pretrain}``, a grid key's list is ``{values: [...]}`` (so a profile that gives
  a conditional grid key new values keeps its ``when``).
- a trial knob belongs to one section: a knob the layer sets in ``fixed``, ``grid`` or
  ``sample`` leaves the file's other sections; set at the top level, it also leaves every
  stage's sections (it holds for every trial), and ``seed`` replaces ``seeds:`` (a layer's
  ``seeds:`` replaces ``seed`` the same way). Set in a stage, it leaves that stage's other
  sections.
- a section of the file that is not a mapping, where the layer gives one, is left as it
  is, for validation to report.

A profile may set ``PROFILE_KEYS``; not ``data_options`` (chosen before a profile applies:
a profile sets the data keys in its ``fixed``), nor ``profiles``. ``profile_problems``
checks the ``profiles:`` mapping's shape; the merged file is validated like any file.
"""

from __future__ import annotations

import re
from typing import Any

from orchestrator.searchfile.space import MAX_NAME_LENGTH
from trainables.problems import Problem, short_repr

PROFILE_KEYS = (
    "name",
    "description",
    "fixed",
    "grid",
    "sample",
    "seeds",
    "stages",
    "search",
    "resources",
    "max_failures",
    "checkpoint",
)
TRIAL_SECTIONS = ("fixed", "grid", "sample")
MAX_PROFILES = 100
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_REFUSED = {
    "data_options": "data_options is chosen before a profile applies: set the data keys (dataset, data_dir, "
    "train_eps, ...) in the profile's fixed",
    "profiles": "profiles do not nest",
    "profile": "a profile is chosen with --profile NAME, not inside another",
}


def merge_layer(raw: dict[str, Any], layer: dict[str, Any]) -> dict[str, Any]:
    """``layer`` (a partial search file) merged over the search file ``raw``; neither is changed.

    The rules are the module's: mappings merge, anything else replaces, shorthands meet
    mappings as mappings, a trial knob the layer sets leaves the file's other sections.
    """
    return _merge_level(raw, layer, ())


def _without(section: Any, knobs: set[str]) -> Any:
    """A trial section without ``knobs`` (a section that is not a mapping is left to validation)."""
    return {k: v for k, v in section.items() if k not in knobs} if isinstance(section, dict) else section


def _merge_level(raw: dict[str, Any], layer: dict[str, Any], prefix: tuple[str, ...]) -> dict[str, Any]:
    """Merge at the top level (``prefix`` empty) or in the stage ``prefix`` = ``("stages", NAME)``."""
    top = not prefix
    out = dict(raw)
    placed = {(s, k) for s in TRIAL_SECTIONS if isinstance(layer.get(s), dict) for k in layer[s]}
    if top and "seeds" in layer:
        placed.add(("seeds", "seed"))  # seeds: is a grid over seed
    for section in TRIAL_SECTIONS:
        leaving = {knob for s, knob in placed if s != section}
        if section in out and leaving:
            out[section] = _without(out[section], leaving)
    if top:
        knobs = {knob for _, knob in placed}
        if "seed" in knobs and "seeds" not in layer:
            out.pop("seeds", None)
        if knobs and isinstance(out.get("stages"), dict):  # a top-level knob holds for every stage's trials
            out["stages"] = {
                name: {k: _without(v, knobs) if k in TRIAL_SECTIONS else v for k, v in stage.items()}
                if isinstance(stage, dict)
                else stage
                for name, stage in out["stages"].items()
            }
    for key, value in layer.items():
        out[key] = _merge_value(out.get(key), value, (*prefix, key))
    return out


def _merge_value(base: Any, over: Any, path: tuple[str, ...]) -> Any:
    """``over`` merged over ``base`` at ``path`` (key names from the top of the file)."""
    if isinstance(base, dict) or isinstance(over, dict):
        base, over = _as_mapping(base, path), _as_mapping(over, path)
    if not isinstance(over, dict):
        return over
    if base is None:
        base = {}
    if not isinstance(base, dict):
        return base  # the file's own section is no mapping: validation says so
    if len(path) == 2 and path[0] == "stages":
        return _merge_level(base, over, path)
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge_value(base.get(key), value, (*path, key))
    return merged


def _as_mapping(value: Any, path: tuple[str, ...]) -> Any:
    """The mapping a shorthand at ``path`` stands for (``value`` itself if it is none)."""
    if path == ("search", "scheduler") and isinstance(value, str):
        return {"type": value}
    if len(path) == 3 and path[0] == "stages" and path[2] == "init_from" and isinstance(value, str):
        return {"stage": value}
    in_grid = (len(path) == 2 and path[0] == "grid") or (len(path) == 4 and path[0] == "stages" and path[2] == "grid")
    if in_grid and isinstance(value, list):
        return {"values": value}
    return value


def profile_names(profiles: Any) -> list[str]:
    """The names of a file's profiles (none when ``profiles:`` is not a mapping)."""
    return [str(name) for name in profiles] if isinstance(profiles, dict) else []


def usable_profiles(profiles: Any) -> list[str]:
    """The profiles ``profile_problems`` finds nothing wrong with, in file order."""
    if not isinstance(profiles, dict) or len(profiles) > MAX_PROFILES:
        return []
    return [name for name, body in profiles.items() if not _problems_of(name, body)]


def profile_problems(profiles: Any, only: str | None = None) -> list[Problem]:
    """What is wrong with a file's ``profiles:`` mapping (with ``only``: with that profile).

    Each profile is a mapping of the keys it changes (``PROFILE_KEYS``) under a name that
    ``--profile`` can give and MLflow can record; ``None`` (an empty ``profiles:``) is none.
    At most ``MAX_PROFILES`` (``normlab validate`` checks each).
    """
    if profiles is None:
        return []
    if not isinstance(profiles, dict):
        return [
            (
                "profiles",
                "a mapping of profile names to partial search files, e.g. {paper: {fixed: {epochs: 164}}} "
                f"(got {short_repr(profiles)})",
            )
        ]
    if len(profiles) > MAX_PROFILES:
        return [("profiles", f"{len(profiles)} profiles; at most {MAX_PROFILES} (validate checks each one)")]
    if only is not None:
        return _problems_of(only, profiles[only]) if only in profiles else []
    return [problem for name, body in profiles.items() for problem in _problems_of(name, body)]


def _problems_of(name: Any, body: Any) -> list[Problem]:
    """What is wrong with one profile: its name, that it is a mapping, the keys it sets."""
    where = f"profiles.{name}"
    problems: list[Problem] = []
    if not isinstance(name, str) or not _PROFILE_NAME.match(name) or len(name) > MAX_NAME_LENGTH:
        problems.append(
            (
                where,
                f"profile name {short_repr(name)}: letters, digits, '_', '.', '-', at most {MAX_NAME_LENGTH} "
                "characters (--profile NAME picks it; MLflow records it)",
            )
        )
    if not isinstance(body, dict):
        problems.append((where, f"a partial search file: a mapping of the keys it changes, got {short_repr(body)}"))
        return problems
    for key in body:
        if key not in PROFILE_KEYS:
            reason = _REFUSED.get(str(key), "unknown key")
            problems.append((f"{where}.{key}", f"{reason} (a profile may set: {', '.join(PROFILE_KEYS)})"))
    return problems
