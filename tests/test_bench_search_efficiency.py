"""The search-efficiency benchmark's pure parts against hand-computed values: the 2-D hypervolume,
the Pareto front, the compute spent until a target is reached, the summary over seeds, reading
Ray Tune's result files, and its search spaces (valid, and one space searched by every one). No Ray."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location(
    "bench_search_efficiency", ROOT / "benchmarks" / "bench_search_efficiency.py"
)
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench  # dataclasses look their module up by name
_spec.loader.exec_module(bench)
T = bench.TrialOutcome


def test_hypervolume_of_hand_computed_fronts() -> None:
    assert bench.hypervolume_2d([]) == 0.0
    assert bench.hypervolume_2d([(0.9, 0.8)]) == pytest.approx(0.72)
    # two rectangles 1 x 0.5 and 0.5 x 1 overlap in 0.5 x 0.5: 0.5 + 0.5 - 0.25
    assert bench.hypervolume_2d([(1.0, 0.5), (0.5, 1.0)]) == pytest.approx(0.75)
    # a dominated point, a duplicate and a point on the reference lines add nothing
    assert bench.hypervolume_2d([(1.0, 0.5), (0.5, 1.0), (0.4, 0.4), (1.0, 0.5), (0.0, 2.0)]) == pytest.approx(0.75)
    # three steps: 0.9 x 0.2 + 0.6 x (0.6 - 0.2) + 0.3 x (0.9 - 0.6)
    assert bench.hypervolume_2d([(0.3, 0.9), (0.9, 0.2), (0.6, 0.6)]) == pytest.approx(0.18 + 0.24 + 0.09)
    # the same x twice: the higher y counts
    assert bench.hypervolume_2d([(0.5, 0.5), (0.5, 0.7)]) == pytest.approx(0.35)
    # another reference point: (0.9 - 0.5) x (0.8 - 0.5); points on its lines add nothing
    assert bench.hypervolume_2d([(0.9, 0.8), (1.0, 0.5)], ref=(0.5, 0.5)) == pytest.approx(0.12)


def test_pareto_front() -> None:
    points = [(0.3, 0.9), (0.9, 0.2), (0.6, 0.6), (0.5, 0.5), (0.9, 0.1), (0.6, 0.6)]
    assert bench.pareto_front(points) == [(0.9, 0.2), (0.6, 0.6), (0.3, 0.9)]


def test_running_best_and_hypervolume() -> None:
    assert bench.best_so_far([None, 0.5, None, 0.4, 0.7]) == [-math.inf, 0.5, 0.5, 0.5, 0.7]
    assert bench.hypervolume_so_far([None, (1.0, 0.5), None, (0.5, 1.0)]) == pytest.approx([0.0, 0.5, 0.5, 0.75])


def test_compute_to_reach() -> None:
    costs, progress = [6, 2, 6, 6], [0.5, 0.5, 0.8, 0.9]
    assert bench.compute_to_reach(costs, progress, 0.8) == 14  # the trial that reaches it counts
    assert bench.compute_to_reach(costs, progress, 0.5) == 6
    assert bench.compute_to_reach(costs, progress, 0.95) is None
    assert bench.compute_to_reach([], [], 0.1) is None
    with pytest.raises(ValueError):
        bench.compute_to_reach([1, 2], [0.1], 0.1)


def test_compute_to_best_pgd_in_completion_order() -> None:
    trials = [  # given out of order: completion order is (end time, trial number)
        T(epochs=6, clean=0.95, pgd=0.865, order=(30.0, 3)),  # 0.875 - 0.01 exactly: reaches it
        T(epochs=6, clean=0.97, pgd=0.80, order=(10.0, 0)),
        T(epochs=2, order=(12.0, 1)),  # stopped by ASHA: costs 2 epochs, no final accuracy
        T(epochs=6, clean=0.99, pgd=0.70, order=(20.0, 2)),
    ]
    assert bench.compute_to_best_pgd(trials, grid_best=0.875) == 6 + 2 + 6 + 6
    assert bench.compute_to_best_pgd(trials, grid_best=0.80, tol=0.0) == 6
    assert bench.compute_to_best_pgd(trials, grid_best=0.9) is None  # 0.865 < 0.89
    # counted in trials, or in seconds
    assert bench.compute_to_best_pgd(trials, grid_best=0.875, cost=bench.one) == 4
    assert bench.compute_to_best_pgd(trials, grid_best=0.80, tol=0.0, cost=bench.one) == 1
    assert bench.compute_to_best_pgd(trials, grid_best=0.9, cost=bench.one) is None
    timed = [T(epochs=6, pgd=0.80, seconds=10.0, order=(1.0, 0)), T(epochs=2, seconds=4.5, order=(2.0, 1))]
    late = T(epochs=6, pgd=0.87, seconds=9.0, order=(3.0, 2))
    assert bench.compute_to_best_pgd([*timed, late], 0.875, cost=bench.seconds) == pytest.approx(23.5)


def test_compute_to_hypervolume() -> None:
    trials = [T(epochs=6, clean=1.0, pgd=0.5, order=(1.0, 0)), T(epochs=2, order=(2.0, 1))]
    # grid front {(1, 0.5), (0.5, 1)}: hypervolume 0.75; 1% below it is 0.7425
    reached = [*trials, T(epochs=6, clean=0.5, pgd=1.0, order=(3.0, 2))]
    assert bench.compute_to_hypervolume(reached, grid_hv=0.75) == 14
    # (0.5, 0.98) adds 0.5 x 0.48: 0.74 < 0.7425
    missed = [*trials, T(epochs=6, clean=0.5, pgd=0.98, order=(3.0, 2))]
    assert bench.compute_to_hypervolume(missed, grid_hv=0.75) is None
    assert bench.compute_to_hypervolume(missed, grid_hv=0.75, rel_tol=0.02) == 14  # 0.735
    assert bench.compute_to_hypervolume(reached, grid_hv=0.75, cost=bench.one) == 3
    assert bench.compute_to_hypervolume(missed, grid_hv=0.75, cost=bench.one) is None


def test_summarize_over_seeds() -> None:
    assert bench.summarize([0.3, 0.1, 0.2]) == {"median": 0.2, "min": 0.1, "max": 0.3, "reached": 3, "runs": 3}
    # a seed that never reached counts as infinite: the median is still the middle seed's
    assert bench.summarize([0.3, None, 0.2]) == {"median": 0.3, "min": 0.2, "max": None, "reached": 2, "runs": 3}
    assert bench.summarize([None, None, 0.2])["median"] is None
    assert bench.summarize([0.2, 0.4])["median"] == pytest.approx(0.3)
    assert bench.summarize([])["runs"] == 0
    assert bench.fmt_ratio(bench.summarize([0.3, None, 0.2])) == "0.30 (0.20-never)"
    assert bench.fmt_ratio(bench.summarize([None, None, 0.2])) == "never (0.20-never)"


def test_table_rows_are_ratios_of_the_grid_compute() -> None:
    def run(seed: int, pgd: float | None, hv: float | None) -> object:
        return bench.RunFigures(
            config="tpe", seed=seed, trials=40, finished=40, compute=240, wall_s=1.0, pgd_compute=pgd,
            hv_compute=hv, pgd_trials=None if pgd is None else int(pgd // 6), hv_trials=None, best_pgd=0.87,
            hv=0.86, best_params={}, same_as_grid=40, seconds=300.0, pgd_seconds=None if pgd is None else pgd / 2,
            hv_seconds=None,
        )  # fmt: skip

    runs = [run(0, 60, None), run(1, 120, 240), run(2, 180, None)]
    rows = bench.table_rows(["tpe"], runs, grid_compute=600)
    a, b = rows
    assert (a["target"], a["ratios"], a["median"], a["reached"], a["meets_third"]) == (
        "a",
        [0.1, 0.2, 0.3],
        0.2,
        3,
        True,
    )
    assert a["trials_to_reach"] == [10, 20, 30] and a["budget_ratio"] == [0.4, 0.4, 0.4]
    assert (b["median"], b["min"], b["max"], b["reached"], b["meets_third"]) == (None, 0.4, None, 1, False)
    assert "0.20 (0.10-0.30)" in bench.format_table(rows)


def test_read_trials_from_ray_result_files(tmp_path: Path) -> None:
    def trial(name: str, trial_id: str, rows: list[dict], params: dict) -> None:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "result.json").write_text("".join(json.dumps({"trial_id": trial_id, **r}) + "\n" for r in rows))
        (folder / "params.json").write_text(json.dumps(params))

    final = {"final_clean_acc": 0.9, "final_adv_acc": 0.8}
    trial(
        "train_a_00001_1_lr=0.3",
        "a_00001",
        [{"training_iteration": i, "timestamp": 100 + i, "time_total_s": float(i)} for i in (1, 2)],
        {"norm": "robustnorm", "lr": 0.3},
    )
    trial(
        "train_a_00000_0_lr=0.1",
        "a_00000",
        [
            {"training_iteration": i, "timestamp": 90 + i, "time_total_s": float(i), **(final if i == 3 else {})}
            for i in (1, 2, 3)
        ],
        {"grid": {"norm": "robustnorm_mixed"}, "lr": 0.1},
    )
    trial("train_a_00002_2_x", "a_00002", [], {})  # never reported: no compute, left out
    trials = bench.read_trials(tmp_path)
    assert [(t.epochs, t.clean, t.pgd) for t in trials] == [(3, 0.9, 0.8), (2, None, None)]
    assert trials[0].params == {"norm": "robustnorm_mixed", "lr": 0.1}
    assert trials[0].order == (93.0, 0) and trials[1].seconds == 2.0
    assert bench.trial_number("train_0751cf0f_12_lr=0.0300,norm=robustnorm_2026-12-07_02-33-10", "0751cf0f") == 12
    assert bench.trial_number("train_988bc_00003_3_norm_power=1.0000_2026-12-07", "988bc_00003") == 3
    assert bench.trial_number("elsewhere", "0751cf0f") == -1
    # a cache round trip keeps them
    assert bench.trials_from_json(json.loads(json.dumps(bench.trials_to_json(trials)))) == trials


def test_spaces_search_the_grid_space() -> None:
    from orchestrator.searchfile.load import load_space

    grid, _ = load_space(str(bench.GRID_SPACE))
    assert grid.search.algorithm == "grid" and grid.trial_count() == 96
    for config in bench.CONFIGS + bench.ABLATIONS:
        space, _ = load_space(str(bench.SPACES / f"efficiency_{config}.yaml"), ["sampler_seed=2"])
        assert space.search.algorithm == "optuna" and space.search.sampler_seed == 2
        assert space.fixed == grid.fixed and space.grid == grid.grid, config
        assert space.search.sampler_name == ("tpe" if config.startswith("tpe") else "nsgaii")
        assert space.search.scheduler.type == ("asha" if "_asha" in config else "fifo")


def test_cache_fingerprint_is_the_content_and_overrides(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.yaml", tmp_path / "b.yaml", tmp_path / "c.yaml"
    a.write_text("name: x\nfixed: {epochs: 6}\n")
    b.write_text("# a comment\nname: x\nfixed:\n  epochs: 6   # the same\n")
    c.write_text("name: x\nfixed: {epochs: 5}\n")
    assert bench.fingerprint(a, []) == bench.fingerprint(b, [])
    assert bench.fingerprint(a, []) != bench.fingerprint(c, [])
    assert bench.fingerprint(a, ["sampler_seed=1"]) != bench.fingerprint(a, ["sampler_seed=2"])
