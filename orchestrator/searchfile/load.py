"""Loading a search file: a built-in name or a path, ``data_options``, a profile, command-line overrides, validation.

``load_space`` reads the file with the bounded YAML reader, picks the first applicable
``data_options`` entry, merges the profile ``--profile`` names (``profiles``), then the
``KEY=VALUE`` overrides, validates the structure (pydantic) and then the meaning
(``validate``, or ``stages`` for a staged search), and raises one ``SpaceError`` listing
every problem with the file and the key path (``UnknownProfile`` for a profile the file
does not define). ``load_every_profile`` does the same for the file and each of its profiles.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from orchestrator.searchfile.profiles import merge_layer, profile_names, profile_problems, usable_profiles
from orchestrator.searchfile.space import SearchSpace, SpaceError
from orchestrator.searchfile.stages import stage_problems
from orchestrator.searchfile.validate import init_from_problems, semantic_problems
from trainables.config import parse_overrides
from trainables.problems import Problem, short_repr
from trainables.safe_yaml import YamlRefused, load_yaml_file

SEARCH_OVERRIDES = {
    "num_samples": ("search", "num_samples"),
    "algorithm": ("search", "algorithm"),
    "metric": ("search", "metric"),
    "mode": ("search", "mode"),
    "scheduler": ("search", "scheduler", "type"),
    "max_concurrent_trials": ("search", "max_concurrent_trials"),
    "sampler_seed": ("search", "sampler_seed"),
    "sampler": ("search", "sampler"),
    "storage": ("search", "storage"),  # the Optuna study's database
    "cpu": ("resources", "cpu"),
    "gpu": ("resources", "gpu"),
    "max_failures": ("max_failures",),
    "checkpoint_every": ("checkpoint", "every"),
    "checkpoint_keep": ("checkpoint", "keep"),
    "name": ("name",),
}


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Command-line ``KEY=VALUE``: search settings by their short name, or a trial key fixed for every trial.

    The overrides become a partial search file merged like a profile (``profiles.merge_layer``):
    a trial key fixed here leaves the file's grid and sample (and every stage's sections), and
    ``seed`` replaces ``seeds:``. A section of the file that is not a mapping is left as it is,
    for validation to report.
    """
    layer: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, leaf = SEARCH_OVERRIDES.get(key, ("fixed", key))
        node = layer
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return merge_layer(raw, layer)


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


class UnknownProfile(SpaceError):
    """``--profile NAME`` names a profile the file does not define; the message lists those it does."""


def load_space(
    name_or_path: str, overrides: list[str] | tuple[str, ...] = (), profile: str | None = None
) -> tuple[SearchSpace, Path]:
    """Read a search space, merge ``profile`` (one of its ``profiles:``) and the overrides, and
    validate it; raise ``SpaceError`` listing every problem (its source names the profile), or
    ``UnknownProfile``. Without ``profile`` the shape of every profile is checked too (not what
    each makes of the file: ``load_every_profile``)."""
    raw, path = read_space_file(name_or_path)
    return resolve_space(raw, path, _parsed(overrides), profile), path


def load_every_profile(
    name_or_path: str, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[Path, list[tuple[str | None, SearchSpace | SpaceError]]]:
    """The file itself (profile None), then each of its profiles, resolved as ``load_space``
    would, with the overrides: each a ``SearchSpace`` or the ``SpaceError`` it raises. A profile
    whose shape is wrong is left out: the file's own error lists that. A file that cannot be
    read, or overrides that cannot be parsed, raise ``SpaceError``."""
    raw, path = read_space_file(name_or_path)
    parsed = _parsed(overrides)
    results: list[tuple[str | None, SearchSpace | SpaceError]] = []
    for name in [None, *usable_profiles(raw.get("profiles"))]:
        try:
            results.append((name, resolve_space(raw, path, parsed, name)))
        except SpaceError as exc:
            results.append((name, exc))
    return path, results


def read_space_file(name_or_path: str) -> tuple[dict[str, Any], Path]:
    """The top-level mapping of a search file (a built-in name or a path), or ``SpaceError``."""
    path = resolve_space_path(name_or_path)
    try:
        raw = load_yaml_file(path)
    except YamlRefused as exc:
        raise SpaceError(str(path), exc.problems) from exc
    if not isinstance(raw, dict):
        raise SpaceError(str(path), [("", f"expected a mapping at the top level, got {type(raw).__name__}")])
    return raw, path


def _parsed(overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    try:
        return parse_overrides(list(overrides))
    except ValueError as exc:
        raise SpaceError("command line", [("", str(exc))]) from exc


def _profile_layer(
    raw: dict[str, Any], path: Path, profile: str | None
) -> tuple[dict[str, Any], dict[str, Any] | None, list[Problem]]:
    """The file without its ``profiles:``, the chosen profile (None without one), and the
    problems of the profiles' shape (all of them; with a profile, they are raised, its own only)."""
    raw = dict(raw)
    profiles = raw.pop("profiles", None)
    problems = profile_problems(profiles, only=profile)
    if "profile" in raw:
        raw.pop("profile")
        problems.append(
            (
                "profile",
                "a profile is chosen with --profile NAME on the command line; the file defines them in profiles:",
            )
        )
    if profile is None:
        return raw, None, problems
    profiles = {} if profiles is None else profiles
    names = profile_names(profiles)
    if isinstance(profiles, dict) and profile not in profiles:
        have = f"its profiles: {', '.join(names)}" if names else "it defines none (a top-level profiles: mapping does)"
        raise UnknownProfile(str(path), [("", f"no profile {short_repr(profile)} (--profile); {have}")])
    if problems:
        raise SpaceError(_source(path, profile), problems)
    return raw, profiles[profile], []


def _source(path: Path, profile: str | None) -> str:
    return f"{path} with profile {profile}" if profile else str(path)


def resolve_space(raw: dict[str, Any], path: Path, overrides: dict[str, Any], profile: str | None) -> SearchSpace:
    """A search file's mapping, as read from ``path``, with its data option chosen, ``profile``
    and then the parsed overrides merged, validated; or one ``SpaceError`` with every problem."""
    source = _source(path, profile)
    raw, layer, early = _profile_layer(raw, path, profile)
    try:
        raw = choose_data(raw, path)
    except ValueError as exc:
        raise SpaceError(source, [*early, ("data_options", str(exc))]) from exc
    if layer is not None:
        raw = {**merge_layer(raw, layer), "profile": profile}
    raw = apply_overrides(raw, overrides)
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as err:
        problems = list(early)
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
    problems = [*early, *init_from_problems(space)]
    if space.stages:
        problems += stage_problems(space)
    else:
        problems += semantic_problems(space)
    if problems:
        raise SpaceError(source, problems)
    return space


def _allowed_at(loc: tuple[Any, ...]) -> list[str]:
    """Field names allowed at the parent of ``loc`` (for 'unknown key' messages)."""
    if len(loc) <= 1:  # the top level: the file's keys (profile is the record's, set by --profile)
        return [
            *(f.alias or n for n, f in SearchSpace.model_fields.items() if n != "profile"),
            "data_options",
            "profiles",
        ]
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
