"""Loading a search file: a built-in name or a path, ``data_options``, command-line overrides, validation.

``load_space`` reads the file with the bounded YAML reader, picks the first applicable
``data_options`` entry, applies ``KEY=VALUE`` overrides, validates the structure (pydantic)
and then the meaning (``validate``, or ``stages`` for a staged search), and raises one
``SpaceError`` listing every problem with the file and the key path.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from orchestrator.searchfile.space import SearchSpace, SpaceError
from orchestrator.searchfile.stages import stage_problems
from orchestrator.searchfile.validate import init_from_problems, semantic_problems
from trainables.config import parse_overrides
from trainables.safe_yaml import YamlRefused, load_yaml_file

SEARCH_OVERRIDES = {
    "num_samples": ("search", "num_samples"),
    "algorithm": ("search", "algorithm"),
    "metric": ("search", "metric"),
    "mode": ("search", "mode"),
    "scheduler": ("search", "scheduler", "type"),
    "max_concurrent_trials": ("search", "max_concurrent_trials"),
    "sampler_seed": ("search", "sampler_seed"),
    "cpu": ("resources", "cpu"),
    "gpu": ("resources", "gpu"),
    "max_failures": ("max_failures",),
    "checkpoint_every": ("checkpoint", "every"),
    "checkpoint_keep": ("checkpoint", "keep"),
    "name": ("name",),
}


SHORTHANDS = {"scheduler": "type"}  # a mapping given as one word: scheduler: fifo is {type: fifo}


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Command-line ``KEY=VALUE``: search settings by their short name, or a trial key fixed for every trial.

    A section of the file that is not a mapping is left as it is, for validation to report.
    """
    raw = dict(raw)
    if isinstance(raw.get("stages"), dict):
        raw["stages"] = {k: dict(v) if isinstance(v, dict) else v for k, v in raw["stages"].items()}
    for key, value in overrides.items():
        *parents, leaf = SEARCH_OVERRIDES.get(key, ("fixed", key))
        if key not in SEARCH_OVERRIDES:
            stages = raw.get("stages") if isinstance(raw.get("stages"), dict) else {}
            holders = [raw, *(st for st in stages.values() if isinstance(st, dict))]
            for holder in holders:  # a trial knob on the command line holds for every trial, every stage
                for section in ("grid", "sample", "fixed") if holder is not raw else ("grid", "sample"):
                    if isinstance(holder.get(section), dict) and key in holder[section]:
                        holder[section] = {k: v for k, v in holder[section].items() if k != key}
            if key == "seed":
                raw.pop("seeds", None)
        node = raw
        for p in parents:
            child = node.get(p) or {}
            if p in SHORTHANDS and isinstance(child, str):  # scheduler: fifo, then scheduler=asha
                child = {SHORTHANDS[p]: child}
            if not isinstance(child, dict):
                break
            node[p] = dict(child)
            node = node[p]
        else:
            node[leaf] = value
    return raw


def choose_data(raw: dict[str, Any], path: Path) -> dict[str, Any]:
    """``data_options:``, a list of alternative fixed keys (e.g. a dataset on disk, then digits):
    the first whose ``if_exists`` path exists is merged into ``fixed`` (it wins over the file's
    own fixed keys; command-line overrides win over it). Relative paths (``if_exists`` and a
    ``data_dir``) are looked up in the working directory, then beside the folder that holds the
    file's package or folder (a checkout), and stored absolute, so trials on any node read the
    same folder."""
    options = raw.get("data_options")
    if options is None:
        return raw
    if not isinstance(options, list) or not all(isinstance(o, dict) for o in options) or not options:
        raise ValueError("a list of mappings of fixed keys, each with an optional if_exists: PATH")
    bases = [Path.cwd(), path.resolve().parent.parent]

    def find(value: str) -> Path | None:
        candidate = Path(value).expanduser()
        for base in [Path("/")] if candidate.is_absolute() else bases:
            if (base / candidate).exists():
                return (base / candidate).resolve()
        return None

    for option in options:
        condition = option.get("if_exists")
        if condition is not None and find(str(condition)) is None:
            continue
        chosen = {k: v for k, v in option.items() if k != "if_exists"}
        if isinstance(chosen.get("data_dir"), str):
            found = find(chosen["data_dir"])
            chosen["data_dir"] = str(found) if found else chosen["data_dir"]
        raw = {k: v for k, v in raw.items() if k != "data_options"}
        raw["fixed"] = (
            {**(raw.get("fixed") or {}), **chosen} if isinstance(raw.get("fixed") or {}, dict) else raw.get("fixed")
        )
        return raw
    raise ValueError("no option applies: every if_exists path is missing; add a last option without if_exists")


def builtin_spaces() -> dict[str, Path]:
    """Search spaces shipped in the ``search_spaces`` package, by name."""
    folder = resources.files("search_spaces")
    return {Path(str(f)).stem: Path(str(f)) for f in folder.iterdir() if str(f).endswith((".yaml", ".yml"))}


def resolve_space_path(name_or_path: str) -> Path:
    """A built-in space name (``quickstart``) or a path to a YAML file."""
    try:
        path = Path(name_or_path).expanduser()
        if path.suffix in (".yaml", ".yml") or path.exists():
            if not path.is_file():
                raise SpaceError(str(path), [("", "not a file" if path.exists() else "no such file")])
            return path
    except (OSError, ValueError, RuntimeError) as exc:  # name too long, NUL byte, unknown ~user
        if isinstance(exc, SpaceError):
            raise
        raise SpaceError(name_or_path, [("", f"not a usable path: {exc}")]) from exc
    builtin = builtin_spaces()
    if name_or_path in builtin:
        return builtin[name_or_path]
    raise SpaceError(
        name_or_path, [("", f"neither a file nor a built-in search space; built-in: {', '.join(sorted(builtin))}")]
    )


def load_space(name_or_path: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[SearchSpace, Path]:
    """Read, override and validate a search space; raise ``SpaceError`` listing every problem."""
    path = resolve_space_path(name_or_path)
    source = str(path)
    try:
        raw = load_yaml_file(path)
    except YamlRefused as exc:
        raise SpaceError(source, exc.problems) from exc
    if not isinstance(raw, dict):
        raise SpaceError(source, [("", f"expected a mapping at the top level, got {type(raw).__name__}")])
    try:
        raw = choose_data(raw, path)
    except ValueError as exc:
        raise SpaceError(source, [("data_options", str(exc))]) from exc
    try:
        raw = apply_overrides(raw, parse_overrides(list(overrides)))
    except ValueError as exc:
        raise SpaceError("command line", [("", str(exc))]) from exc
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as err:
        problems = []
        for e in err.errors():
            path_s = ".".join(str(p)[:40] for p in e["loc"])
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key (allowed here: " + ", ".join(_allowed_at(e["loc"])) + ")"
            elif e["type"] == "literal_error":
                msg = msg.replace("Input should be", "allowed:")
            elif e["type"] in ("model_type", "model_attributes_type"):
                msg = "expected a mapping (keys: " + ", ".join(_allowed_at((*e["loc"], ""))) + ")"
            problems.append((path_s, msg))
        raise SpaceError(source, problems) from err
    problems = init_from_problems(space)
    if space.stages:
        problems += stage_problems(space)
    else:
        problems += semantic_problems(space)
    if problems:
        raise SpaceError(source, problems)
    return space, path


def _allowed_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names allowed at the parent of ``loc`` (for 'unknown key' messages)."""
    model: type[BaseModel] = SearchSpace
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None:
            if model is SearchSpace:
                break
            continue
        annotation = field.annotation
        inner = getattr(annotation, "__args__", ())
        candidates = [a for a in (annotation, *inner) if isinstance(a, type) and issubclass(a, BaseModel)]
        if candidates:
            model = candidates[0]
    return [field.alias or name for name, field in model.model_fields.items()]
