"""How much less compute Optuna (with and without ASHA) needs than the full grid to find the same
RobustNorm settings: the search-efficiency benchmark.

The space (``benchmarks/spaces/efficiency_grid.yaml``): RobustNorm's statistic mode x regime x
power x lr on digits with the small CNN, 6 epochs, PGD evaluation; 96 trials. Everything runs
through ``normlab submit`` as a user would (real Ray Tune, a local MLflow store and Optuna study
in a temporary folder, ``--num-cpus 1``: one trial at a time), and each trial's epochs and final
accuracies are read back from Ray Tune's ``result.json`` files.

1. The full grid, once (``--grid-cache F`` keeps its trials, so a rerun skips it; ``--grid-from
   DIR`` reads a grid search already run with ``normlab submit``). Its compute is trials x epochs
   trial-epochs; its targets are the best final PGD accuracy and the hypervolume of its Pareto
   front of (final clean, final PGD) accuracy, reference point (0, 0).
2. Each Optuna configuration (``benchmarks/spaces/efficiency_<config>.yaml``: ``tpe``,
   ``tpe_asha``, ``nsgaii``, ``nsgaii_asha``) once per sampler seed. In completion order, the
   compute spent (sum of epochs each trial trained, ``training_iteration``) until
   (a) the best final PGD accuracy so far is within ``--pgd-tol`` (0.01) of the grid's best;
   (b) the hypervolume of the front so far is within ``--hv-tol`` (1%) of the grid's.
   A trial ASHA stopped costs its epochs and has no final accuracies (no final sweep ran).

Reported per configuration and target: the compute to reach it as a fraction of the grid's
compute, median and min-max over the seeds, how many seeds reached it within their budget
(``num_samples`` trials) and after how many trials. The target is a third of the grid's compute
or less. The JSON also has each run's trial-seconds (Ray's ``time_total_s``: a trial's set-up,
training, evaluation and logging) in all and until each target: every trial pays its set-up, so
ASHA's short trials save less time than epochs; on a shared machine these seconds are not
comparable between runs. Each run also checks that its finished trials reproduce the grid's
accuracies for the same setting (trials are seeded: they should, exactly).

Usage: python benchmarks/bench_search_efficiency.py [--grid-cache F] [--grid-from DIR]
       [--configs tpe,tpe_asha,nsgaii,nsgaii_asha] [--seeds 0,1,2] [--runs-cache F] [--keep DIR]
       [--json-out F] [-- KEY=VALUE overrides for every Optuna run]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SPACES = ROOT / "benchmarks" / "spaces"
GRID_SPACE = SPACES / "efficiency_grid.yaml"
CONFIGS = ("tpe", "tpe_asha", "nsgaii", "nsgaii_asha")
ABLATIONS = ("tpe_asha_grace1",)  # run with --configs: what the tuning changed
KEYS = ("norm", "regime", "norm_power", "lr")  # the grid's keys: a setting
TARGET_RATIO = 1 / 3
EPS = 1e-9  # accuracies are k/360: a float comparison must not miss an exact tie


# ------------------------------------------------------------------ pure functions (unit-tested)


@dataclass(frozen=True)
class TrialOutcome:
    """One trial: the epochs it trained, its final accuracies (None: stopped early, no final sweep),
    its seconds, when it ended and its setting."""

    epochs: int
    clean: float | None = None
    pgd: float | None = None
    seconds: float = 0.0
    order: tuple[float, int] = (0.0, 0)  # (end time, trial number): completion order
    params: dict[str, Any] = field(default_factory=dict)


def pareto_front(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point dominates (both coordinates maximised), the first coordinate descending."""
    front: list[tuple[float, float]] = []
    best_y = -math.inf
    for x, y in sorted(set(points), key=lambda p: (-p[0], -p[1])):
        if y > best_y:
            front.append((x, y))
            best_y = y
    return front


def hypervolume_2d(points: Iterable[tuple[float, float]], ref: tuple[float, float] = (0.0, 0.0)) -> float:
    """Area dominated by ``points`` (both coordinates maximised) and bounded below by ``ref``."""
    rx, ry = ref
    area, best_y = 0.0, ry
    for x, y in pareto_front(p for p in points if p[0] > rx and p[1] > ry):
        if y > best_y:  # the front by x descending: each point adds its strip above the last
            area += (x - rx) * (y - best_y)
            best_y = y
    return area


def best_so_far(values: Sequence[float | None]) -> list[float]:
    """The running maximum of ``values`` (None: no value), -inf before the first."""
    out, best = [], -math.inf
    for v in values:
        if v is not None:
            best = max(best, v)
        out.append(best)
    return out


def hypervolume_so_far(
    points: Sequence[tuple[float, float] | None], ref: tuple[float, float] = (0.0, 0.0)
) -> list[float]:
    """The hypervolume of the first 1, 2, ... points (None: a trial with no point)."""
    seen: list[tuple[float, float]] = []
    out = []
    for p in points:
        if p is not None:
            seen.append(p)
        out.append(hypervolume_2d(seen, ref))
    return out


def compute_to_reach(costs: Sequence[float], progress: Sequence[float], target: float) -> float | None:
    """Compute spent, in order, up to and including the first step whose ``progress`` reaches
    ``target``; None if none does."""
    if len(costs) != len(progress):
        raise ValueError(f"{len(costs)} costs for {len(progress)} progress values")
    spent = 0.0
    for cost, value in zip(costs, progress):
        spent += cost
        if value >= target - EPS:
            return spent
    return None


def in_completion_order(trials: Iterable[TrialOutcome]) -> list[TrialOutcome]:
    return sorted(trials, key=lambda t: t.order)


def epochs(t: TrialOutcome) -> float:
    """A trial's cost in trial-epochs: the epochs it trained."""
    return t.epochs


def compute_to_best_pgd(
    trials: Sequence[TrialOutcome], grid_best: float, tol: float = 0.01, cost: Callable[[TrialOutcome], float] = epochs
) -> float | None:
    """Cost (trial-epochs; ``cost``: of one trial) spent in completion order until the best final PGD
    accuracy is within ``tol`` of ``grid_best``."""
    ordered = in_completion_order(trials)
    return compute_to_reach([cost(t) for t in ordered], best_so_far([t.pgd for t in ordered]), grid_best - tol)


def compute_to_hypervolume(
    trials: Sequence[TrialOutcome],
    grid_hv: float,
    rel_tol: float = 0.01,
    cost: Callable[[TrialOutcome], float] = epochs,
) -> float | None:
    """Cost (trial-epochs; ``cost``: of one trial) spent in completion order until the front's
    hypervolume is within ``rel_tol`` of ``grid_hv``."""
    ordered = in_completion_order(trials)
    points = [(t.clean, t.pgd) if t.clean is not None and t.pgd is not None else None for t in ordered]
    return compute_to_reach([cost(t) for t in ordered], hypervolume_so_far(points), grid_hv * (1 - rel_tol))


def one(t: TrialOutcome) -> float:
    """A trial's cost when counting trials."""
    return 1.0


def seconds(t: TrialOutcome) -> float:
    """A trial's cost in seconds (Ray's ``time_total_s``: set-up, training, evaluation, logging)."""
    return t.seconds


def summarize(ratios: Sequence[float | None]) -> dict[str, Any]:
    """Median and min-max of ``ratios`` over seeds (None: not reached, counted as infinite) and
    how many reached."""
    values = sorted(math.inf if r is None else r for r in ratios)
    n = len(values)
    if n == 0:
        return {"median": None, "min": None, "max": None, "reached": 0, "runs": 0}
    mid = values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2

    def plain(v: float) -> float | None:
        return None if math.isinf(v) else v

    return {
        "median": plain(mid),
        "min": plain(values[0]),
        "max": plain(values[-1]),
        "reached": sum(r is not None for r in ratios),
        "runs": n,
    }


# ------------------------------------------------------------------ running normlab, reading Ray's results


def trial_number(folder: str, trial_id: str) -> int:
    """The trial's number in its search, from Ray's trial folder ``<trainable>_<trial id>_<number>_...``
    (grid ids look like ``988bc_00000``, Optuna's like ``0751cf0f``); -1 if the name has none."""
    _, _, rest = folder.partition(f"_{trial_id}_")
    number = rest.split("_", 1)[0]
    return int(number) if number.isdigit() else -1


def read_trials(experiment: Path) -> list[TrialOutcome]:
    """Every trial of one Ray Tune experiment folder, from its ``result.json`` and ``params.json``."""
    trials = []
    for result in sorted(experiment.glob("*/result.json")):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        if not rows:
            continue  # a trial that never reported: no epoch trained
        last = max(rows, key=lambda r: r["training_iteration"])
        params_file = result.parent / "params.json"
        params = json.loads(params_file.read_text()) if params_file.exists() else {}
        params = {**params.pop("grid", {}), **params}
        finished = "final_adv_acc" in last
        trials.append(
            TrialOutcome(
                epochs=int(last["training_iteration"]),
                clean=float(last["final_clean_acc"]) if finished else None,
                pgd=float(last["final_adv_acc"]) if finished else None,
                seconds=float(last.get("time_total_s", 0.0)),
                order=(float(last.get("timestamp", 0)), trial_number(result.parent.name, str(last["trial_id"]))),
                params=params,
            )
        )
    return in_completion_order(trials)


def find_experiment(folder: Path, name: str) -> Path:
    """The search folder ``NAME-YYYYmmdd-HHMMSS`` in ``folder`` (or ``folder`` itself)."""
    if any(folder.glob("*/result.json")):
        return folder
    found = sorted(p for p in folder.glob(f"{name}-*") if p.is_dir())
    if len(found) != 1:
        raise RuntimeError(f"expected one search folder {name}-* in {folder}, found {len(found)}")
    return found[0]


def normlab_command() -> list[str]:
    """The ``normlab`` beside this interpreter (the venv's), else ``python -m orchestrator.cli``."""
    beside = Path(sys.executable).parent / "normlab"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "orchestrator.cli"]


def submit(space: Path, overrides: Sequence[str], workdir: Path, num_cpus: int) -> tuple[list[TrialOutcome], float]:
    """``normlab submit SPACE overrides`` with its stores in ``workdir``; its trials and wall seconds."""
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [
        *normlab_command(),
        "submit",
        str(space),
        *overrides,
        "--storage-path",
        str(workdir / "ray_results"),
        "--tracking-uri",
        f"sqlite:///{workdir / 'mlflow.db'}",
        "--num-cpus",
        str(num_cpus),
    ]
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    log = workdir / "submit.log"
    started = time.perf_counter()
    with log.open("w") as out:
        rc = subprocess.run(cmd, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - started
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"{' '.join(cmd)} exited {rc}; the end of {log}:\n{tail}")
    name = next(o.split("=", 1)[1] for o in [*overrides, f"name={space_name(space)}"] if o.startswith("name="))
    return read_trials(find_experiment(workdir / "ray_results", name)), wall


def space_name(space: Path) -> str:
    for line in space.read_text().splitlines():
        if line.startswith("name:"):
            return line.split(":", 1)[1].strip()
    raise ValueError(f"{space}: no name")


def fingerprint(space: Path, overrides: Sequence[str]) -> str:
    """What a cached search ran: the space file's content (comments and layout aside) and the overrides."""
    from trainables.safe_yaml import load_yaml_file

    content = json.dumps(load_yaml_file(space), sort_keys=True, default=str)
    return hashlib.sha256("\0".join([content, *overrides]).encode()).hexdigest()[:16]


def trials_to_json(trials: Sequence[TrialOutcome]) -> list[dict[str, Any]]:
    return [asdict(t) for t in trials]


def trials_from_json(rows: Sequence[dict[str, Any]]) -> list[TrialOutcome]:
    return [TrialOutcome(**{**r, "order": tuple(r["order"])}) for r in rows]


# ------------------------------------------------------------------ the benchmark


@dataclass
class RunFigures:
    config: str
    seed: int
    trials: int
    finished: int
    compute: int
    wall_s: float
    pgd_compute: float | None
    hv_compute: float | None
    pgd_trials: int | None  # trials run (completion order) until target (a) was reached
    hv_trials: int | None
    seconds: float  # the trials' seconds (time_total_s), all of them
    pgd_seconds: float | None  # ... until target (a) was reached
    hv_seconds: float | None
    best_pgd: float | None  # None: no trial ran to the end
    hv: float
    best_params: dict[str, Any]
    same_as_grid: int  # finished trials whose final accuracies equal the grid's trial of the same setting


def setting(t: TrialOutcome) -> tuple[Any, ...]:
    return tuple(t.params.get(k) for k in KEYS)


def as_int(value: float | None) -> int | None:
    return None if value is None else round(value)


def run_figures(
    config: str, seed: int, trials: Sequence[TrialOutcome], wall: float, grid: dict[str, Any], args: Any
) -> RunFigures:
    done = [t for t in trials if t.pgd is not None]
    best = max(done, key=lambda t: t.pgd or 0.0, default=None)
    points = [(t.clean, t.pgd) for t in done if t.clean is not None and t.pgd is not None]
    return RunFigures(
        config=config,
        seed=seed,
        trials=len(trials),
        finished=len(done),
        compute=sum(t.epochs for t in trials),
        wall_s=round(wall, 1),
        pgd_compute=compute_to_best_pgd(trials, grid["best_pgd"], args.pgd_tol),
        hv_compute=compute_to_hypervolume(trials, grid["hv"], args.hv_tol),
        pgd_trials=as_int(compute_to_best_pgd(trials, grid["best_pgd"], args.pgd_tol, cost=one)),
        hv_trials=as_int(compute_to_hypervolume(trials, grid["hv"], args.hv_tol, cost=one)),
        seconds=round(sum(t.seconds for t in trials), 1),
        pgd_seconds=compute_to_best_pgd(trials, grid["best_pgd"], args.pgd_tol, cost=seconds),
        hv_seconds=compute_to_hypervolume(trials, grid["hv"], args.hv_tol, cost=seconds),
        best_pgd=best.pgd if best else None,
        hv=hypervolume_2d(points),
        best_params={k: best.params.get(k) for k in KEYS} if best else {},
        same_as_grid=sum((t.clean, t.pgd) == grid["by_setting"].get(setting(t)) for t in done),
    )


def load_cache(path: Path | None) -> dict[str, Any]:
    if path and path.exists():
        return json.loads(path.read_text())
    return {}


def save_cache(path: Path | None, data: dict[str, Any]) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1) + "\n")


def grid_results(args: Any, workroot: Path) -> dict[str, Any]:
    """The grid's trials: from ``--grid-cache`` if it matches the space, else from ``--grid-from`` or a run."""
    key = fingerprint(GRID_SPACE, [])
    cached = load_cache(args.grid_cache)
    if cached.get("fingerprint") == key:
        print(f"grid: from {args.grid_cache} ({len(cached['trials'])} trials)", flush=True)
        trials, wall = trials_from_json(cached["trials"]), cached["wall_s"]
    else:
        if args.grid_from:
            print(f"grid: reading {args.grid_from}", flush=True)
            trials, wall = read_trials(find_experiment(args.grid_from, space_name(GRID_SPACE))), None
        else:
            print(f"grid: normlab submit {GRID_SPACE.name} ...", flush=True)
            trials, wall = submit(GRID_SPACE, [], workroot / "grid", args.num_cpus)
        save_cache(args.grid_cache, {"fingerprint": key, "wall_s": wall, "trials": trials_to_json(trials)})
    done = [t for t in trials if t.pgd is not None and t.clean is not None]
    if len(done) != len(trials):
        raise RuntimeError(f"the grid has {len(trials) - len(done)} trial(s) without final accuracies")
    best = max(done, key=lambda t: t.pgd or 0.0)
    points = [(t.clean, t.pgd) for t in done if t.clean is not None and t.pgd is not None]
    near = [t for t in done if (t.pgd or 0.0) >= (best.pgd or 0.0) - args.pgd_tol - EPS]
    return {
        "trials": len(trials),
        "compute": sum(t.epochs for t in trials),
        "seconds": sum(t.seconds for t in trials),
        "wall_s": wall,
        "best_pgd": best.pgd,
        "best_params": {k: best.params.get(k) for k in KEYS},
        "within_tol": len(near),
        "within_tol_params": [{**{k: t.params.get(k) for k in KEYS}, "pgd": t.pgd} for t in near],
        "hv": hypervolume_2d(points),
        "front": pareto_front(points),
        "outcomes": trials,
        "by_setting": {setting(t): (t.clean, t.pgd) for t in done},
    }


def table_rows(configs: Sequence[str], runs: Sequence[RunFigures], grid_compute: int) -> list[dict[str, Any]]:
    """One row per configuration and target: the ratios over seeds, their summary, trials to reach, budgets."""
    rows = []
    for config in configs:
        mine = [r for r in runs if r.config == config]
        for target, attr in (("a", "pgd"), ("b", "hv")):
            spent = [getattr(r, f"{attr}_compute") for r in mine]
            ratios = [None if c is None else c / grid_compute for c in spent]
            s = summarize(ratios)
            rows.append(
                {
                    "config": config,
                    "target": target,
                    **s,
                    "ratios": ratios,
                    "trials_to_reach": [getattr(r, f"{attr}_trials") for r in mine],
                    "budget_ratio": [r.compute / grid_compute for r in mine],
                    "budget_trials": [r.trials for r in mine],
                    "meets_third": s["median"] is not None and s["median"] <= TARGET_RATIO + EPS,
                }
            )
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The table the benchmark prints: one line per row of ``table_rows``."""
    head = (
        "configuration",
        "target",
        "ratio: median (min-max)",
        "per seed",
        "reached",
        "trials to reach",
        "budget: trials, ratio",
    )
    lines = []
    for row in rows:
        per_seed = ", ".join("-" if r is None else f"{r:.2f}" for r in row["ratios"])
        trials = ", ".join("-" if n is None else str(n) for n in row["trials_to_reach"])
        spent = row["budget_ratio"] or [0.0]
        budget = f"{max(row['budget_trials'], default=0)} trials, {min(spent):.2f}-{max(spent):.2f}"
        reached = f"{row['reached']}/{row['runs']}"
        lines.append((row["config"], row["target"], fmt_ratio(row), per_seed, reached, trials, budget))
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    out = ["  ".join(f"{x:<{w}}" for x, w in zip(line, widths)).rstrip() for line in (head, *lines)]
    out.insert(1, "-" * len(out[0]))
    return "\n".join(out)


def fmt_ratio(s: dict[str, Any]) -> str:
    """``median (min-max)``; ``never``: a seed (or the median seed) that did not reach the target."""
    if not s["runs"]:
        return "-"

    def one(v: float | None) -> str:
        return "never" if v is None else f"{v:.2f}"

    return f"{one(s['median'])} ({one(s['min'])}-{one(s['max'])})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help="comma-separated, of " + ", ".join(CONFIGS + ABLATIONS)
    )
    parser.add_argument("--seeds", default="0,1,2", help="sampler seeds, comma-separated")
    parser.add_argument(
        "--num-cpus", type=int, default=1, help="CPUs of each search's local Ray (1: one trial at a time)"
    )
    parser.add_argument("--grid-cache", type=Path, help="JSON of the grid's trials: read if it matches, else written")
    parser.add_argument("--grid-from", type=Path, help="read the grid from this finished search (or storage) folder")
    parser.add_argument("--runs-cache", type=Path, help="JSON of each Optuna run's trials, by configuration and seed")
    parser.add_argument("--keep", type=Path, help="keep every search's folders here (default: a temporary folder)")
    parser.add_argument("--pgd-tol", type=float, default=0.01, help="target (a): within this of the grid's best")
    parser.add_argument(
        "--hv-tol", type=float, default=0.01, help="target (b): within this fraction of its hypervolume"
    )
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE for every Optuna run (e.g. num_samples=30)")
    args = parser.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    unknown = sorted(set(configs) - set(CONFIGS) - set(ABLATIONS))
    if unknown:
        parser.error(f"unknown configuration(s) {', '.join(unknown)}; known: {', '.join(CONFIGS + ABLATIONS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s]

    workroot = args.keep or Path(tempfile.mkdtemp(prefix="normlab-efficiency-"))
    try:
        grid = grid_results(args, workroot)
        print(
            f"grid: {grid['trials']} trials, {grid['compute']} trial-epochs; best final PGD accuracy "
            f"{grid['best_pgd']:.4f} ({grid['within_tol']} trial(s) within {args.pgd_tol}); front hypervolume "
            f"{grid['hv']:.4f} ({len(grid['front'])} point(s)); best setting {grid['best_params']}",
            flush=True,
        )
        cache = load_cache(args.runs_cache)
        runs: list[RunFigures] = []
        run_trials: dict[str, list[dict[str, Any]]] = {}
        for config in configs:
            space = SPACES / f"efficiency_{config}.yaml"
            for seed in seeds:
                overrides = [*args.overrides, f"sampler_seed={seed}"]
                key = f"{config}/{seed}/{fingerprint(space, overrides)}"
                if key in cache:
                    trials, wall = trials_from_json(cache[key]["trials"]), cache[key]["wall_s"]
                else:
                    print(f"{config} seed {seed}: normlab submit {space.name} {' '.join(overrides)} ...", flush=True)
                    trials, wall = submit(space, overrides, workroot / f"{config}-seed{seed}", args.num_cpus)
                    cache[key] = {"wall_s": wall, "trials": trials_to_json(trials)}
                    save_cache(args.runs_cache, cache)
                fig = run_figures(config, seed, trials, wall, grid, args)
                runs.append(fig)
                run_trials[f"{config}/{seed}"] = trials_to_json(trials)
                reach = {
                    "pgd": "-" if fig.pgd_compute is None else f"{fig.pgd_compute:.0f}",
                    "hv": "-" if fig.hv_compute is None else f"{fig.hv_compute:.0f}",
                }
                print(
                    f"  {config} seed {seed}: {fig.trials} trials ({fig.finished} to the end), {fig.compute} trial-epochs, "
                    f"{fig.wall_s:.0f} s; best PGD {fig.best_pgd or 0.0:.4f}, hypervolume {fig.hv:.4f}; trial-epochs to "
                    f"(a) {reach['pgd']}, (b) {reach['hv']}; {fig.same_as_grid}/{fig.finished} finished trials "
                    "reproduce the grid's accuracies",
                    flush=True,
                )
    finally:
        if not args.keep:
            shutil.rmtree(workroot, ignore_errors=True)

    rows = table_rows(configs, runs, grid["compute"])
    print(
        f"\ncompute to reach each target / the grid's ({grid['trials']} trials x {grid['compute'] // grid['trials']} "
        f"epochs = {grid['compute']} trial-epochs); median (min-max) over sampler seeds {args.seeds}; target <= "
        f"{TARGET_RATIO:.2f}. (a) best final PGD accuracy within {args.pgd_tol} of the grid's {grid['best_pgd']:.4f}; "
        f"(b) Pareto front's hypervolume within {args.hv_tol:.0%} of the grid's {grid['hv']:.4f}"
    )
    print(format_table(rows))
    if args.json_out:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from _machine import write_json

        write_json(
            args.json_out,
            "bench_search_efficiency",
            grid={k: v for k, v in grid.items() if k not in ("outcomes", "by_setting")},
            grid_trials=trials_to_json(grid["outcomes"]),
            targets={"pgd_tol": args.pgd_tol, "hv_tol": args.hv_tol, "ratio": TARGET_RATIO},
            table=rows,
            runs=[asdict(r) for r in runs],
            run_trials=run_trials,
            args={k: str(v) for k, v in vars(args).items()},
        )


if __name__ == "__main__":
    main()
