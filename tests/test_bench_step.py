"""The step benchmark's arithmetic against hand-computed values, and one real (tiny) run of it:
what the norm layers cost (``norm_costs``), and every network in its own process with the
allocator setting asked for (page faults only with glibc's defaults)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))  # its _machine
_spec = importlib.util.spec_from_file_location("bench_step", ROOT / "benchmarks" / "bench_step.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = bench
_spec.loader.exec_module(bench)


def test_norm_costs_by_hand() -> None:
    # BN's layers add 50 of its 300 ms, RobustNorm's 40: 0.8 of them
    costs = bench.norm_costs(300.0, 290.0, 250.0, target=0.95)
    assert costs["bn_share"] == pytest.approx(50 / 300)
    assert costs["rn_over_bn_layers"] == pytest.approx(0.8)
    assert costs["best_step_ratio"] == pytest.approx(250 / 300)
    # 15 ms of 300 is 5%: RobustNorm's layers may add 35 ms, 0.7 of batch norm's 50
    assert costs["layers_needed"] == pytest.approx(0.7)
    needed = costs["layers_needed"]
    assert (250 + needed * 50) / 300 == pytest.approx(0.95)
    # norms that cost under 5% of the step: no norm layer could reach the target
    assert bench.norm_costs(300.0, 299.0, 290.0, target=0.95)["layers_needed"] < 0


@pytest.mark.slow
def test_a_tiny_run_times_every_network_with_its_allocator() -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc only")
    res = bench.time_steps(1, reps=3, iters=1, warmup=3, mallocs=("trial", "glibc"), floor=True)
    for figures in res["by_malloc"].values():
        assert set(figures["median_ms"]) == {"batchnorm", "robustnorm", "none"}
        assert all(ms > 0 for ms in figures["median_ms"].values())
        assert figures["floor"]["none_ms"] == figures["median_ms"]["none"]
    assert set(res["kept_over_glibc"]) == {"batchnorm", "robustnorm", "none"}
    # each worker ran with the allocator it was given. glibc's defaults leave some processes
    # settling into reuse and one step of another's heap may still grow, so per network the
    # counts are not reliable in three steps; over the three networks they are far apart
    kept = sum(res["by_malloc"]["trial"]["page_faults_per_step"].values())
    glibc = sum(res["by_malloc"]["glibc"]["page_faults_per_step"].values())
    assert glibc > 5000 and kept < glibc / 5, res["by_malloc"]
