"""A whole search's wall time against the compute it runs: the search's efficiency, and where the rest goes.

Runs ``normlab submit SPACE`` (default: the quickstart) as a user would, from the command's
start to its exit, with ``NORMLAB_PROFILE`` set so the driver and every trial record timed
spans (``trainables.profiling``). Then runs the same trials' configurations (each trial's
resolved values from the search's own folders) one after the other in this process with
``run_trial``: the bare training-and-evaluation time, no Ray, no MLflow, no checkpoints,
imports already done. Reported, median over ``--reps``:

- efficiency = (bare compute / slots) / search wall time, slots = trials that run at once
  (CPUs / CPUs per trial, at most the number of trials). The target for the quickstart
  is 0.8 or more.
- where the wall time goes, in seconds of wall time (work in the trials' slots divided by
  the slots), summing to the wall time: the driver's imports, MLflow set-up, Ray start; in
  the trials, worker start (process and imports), the wait until Tune's saved state lists
  the trial (``trainables.tune_state``), trial set-up (run, data, model),
  training, per-epoch evaluation, final attack sweep, MLflow logging, checkpoints, Tune's
  report (it persists the checkpoint), and slot time no trial used; then the end of the
  search (summary, report, plots) and the exit.
- the CPU the machine spent during the search (``/proc/stat``: the driver, Ray's own
  processes, the workers; run it on an idle machine), and the ceiling it puts on the
  efficiency: however well packed, the search needs at least that CPU / the machine's cores
  of wall time.

Usage: python benchmarks/bench_search.py [--space quickstart] [--reps 3] [--num-cpus 2]
       [--json-out F] [--code CHECKOUT] [-- overrides...]

``--code`` runs the search with normlab from another checkout (a ``git worktree`` of an
older commit: "before" figures on the same machine, same venv; a commit from before the
spans existed gives the wall time and the efficiency only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _machine import cpu_model, default_threads, load_average  # noqa: E402

from trainables.profiling import read_spans  # noqa: E402

# the parts of a trial's slot time, in the order the table shows them: label, span names
TRIAL_PARTS = (
    ("worker start (process, warm-up imports)", ("worker.boot", "worker.warm_up")),
    ("waiting for Tune's saved state", ("trial.wait_for_tune_state",)),
    ("trial set-up (run, data, model)", ("trial.prepare", "trial.build")),
    ("training", ("trial.train",)),
    ("per-epoch evaluation", ("trial.eval",)),
    ("final attack sweep", ("trial.final_eval",)),
    ("MLflow logging", ("trial.tracking",)),
    ("checkpoints", ("trial.checkpoint",)),
    ("Tune report (persists the checkpoint)", ("trial.report",)),
)


# the driver's parts before the trials, in the order that claims a moment when several run at once
DRIVER_PARTS = (
    ("Ray start", ("driver.ray_start",)),
    ("driver imports", ("driver.imports",)),
    ("MLflow set-up (store, search run)", ("driver.tracking",)),
)
DRIVER_OTHER = "driver: other before the trials"


def _sweep(
    spans: list[dict[str, Any]], lo: float, hi: float, parts: tuple[tuple[str, tuple[str, ...]], ...]
) -> dict[str, float]:
    """Seconds of [lo, hi], each moment given to the first of ``parts`` with a span under way
    then, or to ``DRIVER_OTHER``: parts that overlap are counted once, in ``parts``' order."""
    out = {label: 0.0 for label, _ in parts} | {DRIVER_OTHER: 0.0}
    cuts = sorted({lo, hi, *(t for s in spans for t in (s["start"], s["end"]) if lo < t < hi)})
    for a, b in zip(cuts, cuts[1:]):
        mid = (a + b) / 2
        label = next(
            (
                label
                for label, names in parts
                if any(s["span"] in names and s["start"] <= mid < s["end"] for s in spans)
            ),
            DRIVER_OTHER,
        )
        out[label] += b - a
    return out


def _overlap(span: dict[str, Any], lo: float, hi: float) -> float:
    return max(0.0, min(span["end"], hi) - max(span["start"], lo))


def _exclusive(spans: list[dict[str, Any]], name: str, lo: float, hi: float) -> float:
    """Seconds in spans ``name`` within [lo, hi], less the time of spans nested in them in the same process."""
    total = 0.0
    for s in spans:
        if s["span"] != name:
            continue
        inner = sum(
            _overlap(t, max(s["start"], lo), min(s["end"], hi))
            for t in spans
            if t is not s and t["pid"] == s["pid"] and t["start"] >= s["start"] and t["end"] <= s["end"]
        )
        total += _overlap(s, lo, hi) - inner
    return total


def breakdown(spans: list[dict[str, Any]], started: float, ended: float, slots: int) -> dict[str, float]:
    """Where a search's wall time went, in seconds of wall time, from its spans (see the module doc)."""
    driver = [s for s in spans if s["span"].startswith("driver.")]
    fits = [s for s in driver if s["span"] == "driver.fit"]
    if not fits:  # a normlab without spans (--code of an older commit): the wall time only
        return {"(no spans)": ended - started}
    fit_lo, fit_hi = min(s["start"] for s in fits), max(s["end"] for s in fits)
    out: dict[str, float] = {}
    first = next((s for s in driver if s["span"] == "driver.start"), None)
    # the driver's set-up runs partly at once (a thread imports and sets up tracking while Ray
    # starts): each moment before the trials goes to the first of these that was under way
    lo = first["end"] if first else started
    before = _sweep(driver, lo, fit_lo, DRIVER_PARTS)
    out["driver imports"] = (lo - started) + before.pop("driver imports")
    out.update(before)
    trial = [s for s in spans if s["pid"] != first_pid(driver)]  # the driver imports trainables too
    used = 0.0
    for label, names in TRIAL_PARTS:
        seconds = sum(_exclusive(trial, name, fit_lo, fit_hi) for name in names)
        out[label] = seconds / slots
        used += seconds
    out["slot time no trial used"] = ((fit_hi - fit_lo) * slots - used) / slots
    finish = [s for s in driver if s["span"] == "driver.finish"]
    out["end of search (summary, report)"] = sum(_overlap(s, fit_hi, ended) for s in finish)
    out["exit"] = (ended - fit_hi) - out["end of search (summary, report)"]
    return out


def first_pid(driver: list[dict[str, Any]]) -> int | None:
    """The driver's process id (from its first span)."""
    return driver[0]["pid"] if driver else None


def slots_of(trials: int, num_cpus: int, cpu_per_trial: float) -> int:
    """How many trials run at once: whole trials that fit the CPUs, at most the number of trials."""
    return max(1, min(trials, int(num_cpus // cpu_per_trial)))


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (``/proc/stat``; None elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_ceiling(bare_compute: float, slots: int, busy: float | None, cores: int) -> float | None:
    """The highest efficiency a search that kept the machine's ``cores`` busy for ``busy`` CPU
    seconds could reach, however well packed: its wall time is at least busy / cores."""
    if not busy:
        return None
    return min(1.0, bare_compute / slots / (busy / cores))


def run_search(
    space: str, overrides: list[str], num_cpus: int, workdir: Path, code: Path | None = None
) -> tuple[float, float, list[dict[str, Any]], Path, float | None]:
    """``normlab submit`` as a subprocess in ``workdir`` (``code``: run normlab from that checkout
    instead): its start and end, its spans, its search folder, and the CPU seconds the machine
    spent meanwhile (every process: the driver, Ray's, the workers; run it on an idle machine)."""
    profile = workdir / "spans"
    profile.mkdir()
    env = {**os.environ, "NORMLAB_PROFILE": str(profile), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    if code is not None:
        env["PYTHONPATH"] = str(code.resolve())
    normlab = [sys.executable, "-m", "orchestrator.cli"]
    command = [*normlab, "submit", space, *overrides, "--num-cpus", str(num_cpus), "--storage-path", "ray"]
    cpu_before, started = busy_cpu_seconds(), time.time()
    proc = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    ended, cpu_after = time.time(), busy_cpu_seconds()
    busy = cpu_after - cpu_before if cpu_before is not None and cpu_after is not None else None
    if proc.returncode != 0:
        raise SystemExit(f"normlab submit failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    (folder,) = [p for p in (workdir / "ray").iterdir() if p.is_dir()]
    return started, ended, read_spans(profile), folder, busy


def trial_values(folder: Path, space: str, overrides: list[str]) -> list[dict[str, Any]]:
    """Each trial's resolved values, as its trainable got them (threads and device as Ray's resources make them)."""
    from orchestrator.running.tuner import TrialResolver
    from orchestrator.searchfile.load import load_space
    from trainables.ray_trainable import runtime_settings

    spec, _ = load_space(space, overrides)
    resolve = TrialResolver(spec.fixed, frozenset(spec.conditional_keys()))
    out = []
    for params in sorted(folder.glob("*/params.json")):
        values = resolve(json.loads(params.read_text()))
        values.update(runtime_settings(values, cpus=spec.resources.cpu, gpus=0))
        out.append(values)
    return out


def bare(values: list[dict[str, Any]]) -> float:
    """Seconds ``run_trial`` takes for each configuration, one after the other, summed."""
    import torch

    from trainables.trial import run_trial

    run_trial({**values[0], "epochs": 1})  # warm-up: imports, the dataset's cache, torch's first calls
    total = 0.0
    for v in values:
        torch.set_num_threads(int(v["threads"]))
        total += run_trial(v).seconds
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--space", default="quickstart")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=default_threads())
    parser.add_argument("--json-out", type=Path)
    parser.add_argument(
        "--code",
        type=Path,
        help="run the search with normlab from this checkout (e.g. a git worktree of an older commit)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the search file")
    args = parser.parse_args()
    from orchestrator.searchfile.load import load_space

    spec, _ = load_space(args.space, args.overrides)
    slots = slots_of(spec.trial_count(), args.num_cpus, spec.resources.cpu)
    cores = os.cpu_count() or 1
    walls, computes, parts, busies, ceilings = [], [], [], [], []
    for rep in range(args.reps):
        with tempfile.TemporaryDirectory(prefix="bench-search-") as tmp:
            started, ended, spans, folder, busy = run_search(
                args.space, args.overrides, args.num_cpus, Path(tmp), args.code
            )
            compute = bare(trial_values(folder, args.space, args.overrides))
        wall = ended - started
        walls.append(wall)
        computes.append(compute)
        parts.append(breakdown(spans, started, ended, slots))
        busies.append(busy)
        ceilings.append(cpu_ceiling(compute, slots, busy, cores))
        print(
            f"rep {rep + 1}/{args.reps}: search {wall:.1f} s, bare compute {compute:.1f} s / {slots} slots "
            f"= {compute / slots:.1f} s, efficiency {compute / slots / wall:.2f}"
            + (f"; machine CPU {busy:.1f} s, ceiling {ceilings[-1]:.2f}" if busy else ""),
            flush=True,
        )
    efficiencies = [c / slots / w for c, w in zip(computes, walls)]
    median = {k: statistics.median(p[k] for p in parts) for k in parts[0]}
    print(
        f"\nnormlab submit {args.space} {' '.join(args.overrides)}: {spec.trial_count()} trials, {slots} slots "
        f"({args.num_cpus} CPUs, {spec.resources.cpu:g} per trial); {cpu_model()}, load {load_average():.2f}"
    )
    print(f"wall time          {statistics.median(walls):6.1f} s  (median of {args.reps})")
    print(f"bare compute/slots {statistics.median(computes) / slots:6.1f} s")
    print(
        f"efficiency         {statistics.median(efficiencies):6.2f}    (target >= 0.8; runs: "
        f"{', '.join(f'{e:.2f}' for e in efficiencies)})"
    )
    if all(busies):
        print(
            f"machine CPU        {statistics.median(busies):6.1f} s  on {cores} cores: no schedule finishes in less "
            f"than {statistics.median(busies) / cores:.1f} s, so efficiency <= {statistics.median(ceilings):.2f}"
        )
    print("\nwhere the wall time goes (seconds of wall time, median):")
    for label, seconds in median.items():
        print(f"  {label:<40} {seconds:6.2f}")
    print(f"  {'(sum)':<40} {sum(median.values()):6.2f}")
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {
                    "benchmark": "bench_search",
                    "space": args.space,
                    "overrides": args.overrides,
                    "slots": slots,
                    "walls": walls,
                    "bare_computes": computes,
                    "efficiencies": efficiencies,
                    "efficiency": statistics.median(efficiencies),
                    "breakdown_median": median,
                    "breakdowns": parts,
                    "machine_cpu_s": busies,
                    "cpu_ceilings": ceilings,
                    "cores": cores,
                    "cpu": cpu_model(),
                },
                indent=2,
            )
            + "\n"
        )
        print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
