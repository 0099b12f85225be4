"""Multi-stage searches: stages run in order as one search, a later one starting from an earlier one.

A search file may declare ``stages:`` (in order); each stage has its own ``fixed``, ``grid``
and ``sample`` keys (the top level's ``fixed`` keys, ``seeds`` and search settings apply to
all). A stage with ``init_from: {stage: pretrain}`` (or ``init_from: pretrain``) starts each
of its trials whose regime starts from a checkpoint (``bn_finetune_adv``) from the *final*
checkpoint of its match in the earlier stage: the one earlier trial whose values of the keys
that vary there (its grid keys, e.g. ``norm`` and ``seed``) equal this trial's. Its other
trials (``pgd_at``, ``bn_only_adv`` from random init) start as usual. Matching must be one
to one, and a matched pair must build the same network (model, norm, dataset): ``validate``
checks the whole chain before anything runs.

On disk a staged search is one folder with a Ray Tune experiment per stage
(``<search>/<stage>/``) and one normlab record; in MLflow one parent run, and one child run
per trial tagged with its stage. A later run carries what it started from: the checkpoint
as its ``init_from`` param and ``normlab.init_from_checkpoint`` tag, the earlier trial's
run id as ``normlab.init_from_run_id``.
"""

from __future__ import annotations

from typing import Any

from orchestrator.searchfile.space import GridKey, SearchSpace, StageView, default_of, stage_views
from orchestrator.searchfile.validate import semantic_problems
from trainables.problems import Problem
from trainables.regimes import REGIMES

CHECKPOINT_REGIMES = [name for name, regime in REGIMES.items() if regime.from_checkpoint]
SAME_NETWORK = ("model", "norm", "norm_affine", "norm_groups", "dataset", "data_dir")
META_PREFIX = "_"  # keys of a grid combination that are facts for the run, not trial knobs


def needs_checkpoint(values: dict[str, Any]) -> bool:
    return values.get("regime", default_of("regime")) in CHECKPOINT_REGIMES


def _comparable(value: Any) -> Any:
    """A hashable form of a knob's value: numbers as floats (YAML's 1 is JSON's 1.0), lists as
    tuples and mappings as sorted pairs, so list-valued keys (``eval_eps: [[2, 8], [4]]``) match too."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, (list, tuple)):
        return tuple(_comparable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _comparable(v)) for k, v in value.items()))
    return value


def match_key(values: dict[str, Any], keys: list[str]) -> tuple:
    """The values of ``keys`` (defaults where unset), comparable across YAML and JSON."""
    return tuple(_comparable(values.get(k, default_of(k))) for k in keys)


# ------------------------------------------------------------------ validation


def stage_problems(space: SearchSpace) -> list[Problem]:
    """Every problem of every stage (paths under ``stages.<name>``) and of the chain between them."""
    problems: list[Problem] = []
    views = stage_views(space)
    order = [view.name for view in views]
    for i, view in enumerate(views):
        prefix = f"stages.{view.name}"
        checked = view.space
        if view.init_from:  # each trial that starts from a checkpoint gets one: stand in for it
            stand_in = GridKey(
                values=[f"<final checkpoint in stage {view.init_from}>"], when={"regime": CHECKPOINT_REGIMES}
            )
            checked = view.space.model_copy(update={"grid": {**view.space.grid, "init_from": stand_in}})
            if "init_from" in view.space.fixed or "init_from" in view.space.grid or "init_from" in view.space.sample:
                problems.append((f"{prefix}.init_from", "init_from is set twice: as a stage and as a trial knob"))
        problems += [(f"{prefix}.{path}" if path else prefix, msg) for path, msg in semantic_problems(checked)]
        if view.init_from:
            problems += _chain_problems(space, view, order[:i], {v.name: v for v in views})
    return problems


def _chain_problems(
    space: SearchSpace, view: StageView, earlier: list[str], views: dict[str, StageView]
) -> list[Problem]:
    where = f"stages.{view.name}.init_from.stage"
    if view.init_from not in earlier:
        allowed = ", ".join(earlier) or "none (it is the first stage)"
        hint = ""
        if "/" in view.init_from or view.init_from.endswith(".pt"):
            hint = f"; a checkpoint file is the trial knob init_from (fixed: {{init_from: {view.init_from}}})"
        return [(where, f"{view.init_from!r} is not an earlier stage; earlier stages: {allowed}{hint}")]
    source = views[view.init_from].space
    problems: list[Problem] = []
    if space.search.algorithm == "optuna":
        problems.append(
            (
                "search.algorithm",
                "a stage that starts from another runs its trials as a grid: use algorithm grid or random",
            )
        )
    if space.search.scheduler.type == "asha":
        problems.append(
            (
                "search.scheduler",
                "a stage that starts from another needs every earlier trial to finish its "
                "last epoch, and ASHA stops some early: use scheduler: fifo",
            )
        )
    if space.search.num_samples != 1:
        problems.append(
            (
                "search.num_samples",
                "a stage that starts from another needs each earlier trial told apart by "
                "its grid values: num_samples must be 1 (repeat with seeds: [0, 1, 2])",
            )
        )
    if source.sample:
        problems.append(
            (
                f"stages.{view.init_from}.sample",
                f"stage {view.name} starts from this stage, whose trials "
                "must be told apart by grid values: make its sampled keys grid keys",
            )
        )
    if problems:
        return problems
    keys = list(source.grid)
    index: dict[tuple, list[dict[str, Any]]] = {}
    for combo in source.iter_grid_combinations():
        values = {**source.fixed, **combo}
        index.setdefault(match_key(values, keys), []).append(values)
    starting = 0
    for n, combo in enumerate(view.space.iter_grid_combinations(), 1):
        values = {**view.space.fixed, **combo}
        if not needs_checkpoint(values):
            continue
        starting += 1
        label = ", ".join(f"{k}={v}" for k, v in combo.items()) or "its fixed keys"
        found = index.get(match_key(values, keys), [])
        if len(found) != 1:
            shown = ", ".join(keys) or "(no grid keys)"
            problems.append(
                (
                    f"stages.{view.name}.grid",
                    f"trial {n} ({label}) matches {len(found)} trials of stage "
                    f"{view.init_from} on {shown}; it must match exactly one",
                )
            )
        else:
            different = [k for k in SAME_NETWORK if match_key(values, [k]) != match_key(found[0], [k])]
            if different:
                problems.append(
                    (
                        f"stages.{view.name}.grid",
                        f"trial {n} ({label}) would load weights of a different "
                        f"network from stage {view.init_from}: {', '.join(different)} differ",
                    )
                )
        if len(problems) >= 5:
            break
    if not starting:
        problems.append(
            (
                f"stages.{view.name}.init_from",
                f"no trial of this stage starts from a checkpoint (regime "
                f"one of {', '.join(CHECKPOINT_REGIMES)}): drop init_from or add such a regime",
            )
        )
    return problems


# ------------------------------------------------------------------ running
