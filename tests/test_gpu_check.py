"""benchmarks/gpu_check.py: its CPU part end to end, and the logic its GPU part rests on.

The GPU part cannot run here; what it computes from its measurements (trials per hour from
Ray's results, the JUnit counts of ``pytest -m cuda``, which flag helps, the AMP verdict,
the summary) and the search files it submits are checked on the CPU.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def test_the_cpu_part_runs_quick_says_there_is_no_cuda_and_writes_the_cpu_figures(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a GPU machine runs the CPU part here too
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--quick", "--out", str(tmp_path / "out")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    no_cuda = [line for line in proc.stdout.splitlines() if line.startswith("no CUDA")]
    assert len(no_cuda) == 1 and no_cuda[0].startswith("no CUDA on this machine: running the CPU part only")
    figures = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert figures["benchmark"] == "gpu_check" and figures["cuda"] is False and figures["ok"] is True
    steps = figures["steps"]
    assert "not_run" in steps["tests"]
    amp = steps["amp"]
    assert amp["ok"] and amp["device"] == "cpu"
    assert amp["train_dtypes"] == ["torch.bfloat16"]  # autocast really ran, in the CPU's dtype
    assert amp["scaler_states"] and all(state == {} for state in amp["scaler_states"])  # the scaler is off
    assert all(math.isfinite(v) for v in amp["train_loss"])
    assert len(steps["norms"]["shapes"]) == 3 and steps["norms"]["device"] == "cpu"
    rows = steps["throughput"]["rows"]
    assert steps["throughput"]["image_shape"] == [3, 32, 32]
    assert {(r["channels_last"], r["cudnn_benchmark"]) for r in rows} == {(False, False), (True, False)}
    for row in rows:
        assert row["trial_images_per_s"] > 0 and row["plain_images_per_s"] > 0
        assert row["trial_over_plain"] == pytest.approx(row["trial_images_per_s"] / row["plain_images_per_s"])
    search = steps["search"]
    assert search["ran"] is False and search["ok"]
    assert {k: s["validated"]["resources"]["gpu"] for k, s in search["searches"].items()} == {"0.25": 0.25, "1": 1.0}
    assert all(s["validated"]["trials"] == gpu_check.SEARCH_TRIALS for s in search["searches"].values())
    assert "trial" in proc.stdout and "plain" in proc.stdout and "every check passed" in proc.stdout


def test_trials_per_hour_from_spans():
    packed = [(0.0, 100.0), (1.0, 101.0), (2.0, 102.0), (3.0, 103.0)]
    rate = gpu_check.search_rate(packed, wall_s=120.0)
    assert rate["trials"] == 4 and rate["makespan_s"] == 103.0
    assert rate["trials_per_hour"] == pytest.approx(4 * 3600 / 103)
    assert rate["trials_per_hour_wall"] == pytest.approx(4 * 3600 / 120)
    assert rate["mean_trial_s"] == 100.0 and rate["concurrency"] == pytest.approx(400 / 103)
    one_by_one = [(100.0 * i, 100.0 * (i + 1)) for i in range(4)]
    alone = gpu_check.search_rate(one_by_one)
    assert alone["trials_per_hour"] == pytest.approx(36.0) and alone["concurrency"] == pytest.approx(1.0)
    assert alone["trials_per_hour_wall"] is None
    speedup = gpu_check.packing_speedup({"0.25": rate, "1": alone})
    assert speedup == pytest.approx((4 * 3600 / 103) / 36)
    empty = gpu_check.search_rate([], wall_s=50.0)
    assert empty["trials"] == 0 and empty["trials_per_hour"] is None and empty["trials_per_hour_wall"] is None
    assert gpu_check.search_rate([(5.0, 5.0)])["trials_per_hour"] is None  # no time measured: no rate
    assert gpu_check.packing_speedup({"0.25": rate, "1": empty}) is None


def test_trial_spans_come_from_the_newest_search_folders_ray_results(tmp_path):
    def write(run: str, trial: str, rows: list[dict]) -> None:
        folder = tmp_path / run / trial
        folder.mkdir(parents=True)
        (folder / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))

    write("gpucheck-gpu025-20260101-000000", "train_a_00000", [{"timestamp": 1, "time_total_s": 1.0}])
    rows_a = [
        {"timestamp": 1000, "time_total_s": 8.5, "train_images_per_s": 900.0},
        {"timestamp": 1010, "time_total_s": 18.25, "train_images_per_s": 1000.0, "final_clean_acc": 0.5},
    ]
    rows_b = [{"timestamp": 1012, "time_total_s": 12.0}]
    write("gpucheck-gpu025-20260102-000000", "train_b_00000", rows_a)
    write("gpucheck-gpu025-20260102-000000", "train_b_00001", rows_b)
    write("gpucheck-gpu1-20260102-000000", "train_c_00000", [{"timestamp": 5, "time_total_s": 1.0}])
    os.utime(tmp_path / "gpucheck-gpu025-20260101-000000", (1, 1))  # the older search of that name
    trials = gpu_check.read_trial_results(tmp_path, "gpucheck-gpu025")
    assert trials == [rows_a, rows_b]
    spans = [gpu_check.trial_span(rows) for rows in trials]
    assert spans == [(1010 - 18.25, 1010.0), (1000.0, 1012.0)]
    assert gpu_check.search_rate(spans)["makespan_s"] == pytest.approx(1012 - 991.75)
    assert gpu_check.read_trial_results(tmp_path, "gpucheck-gpu05") == []


def test_junit_counts_and_failed_tests(tmp_path):
    (tmp_path / "j.xml").write_text(
        '<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">'
        '<testsuite name="pytest" errors="1" failures="1" skipped="2" tests="7">'
        '<testcase classname="tests.test_trial" name="test_a"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_norm_paths" name="test_b[x]"><error message="setup"/></testcase>'
        '<testcase classname="tests.test_trial" name="test_c"><skipped message="no"/></testcase>'
        '<testcase classname="tests.test_trial" name="test_d"/>'
        "</testsuite></testsuites>"
    )
    counts = gpu_check.parse_junit(tmp_path / "j.xml")
    assert {k: counts[k] for k in ("tests", "failures", "errors", "skipped", "passed")} == {
        "tests": 7,
        "failures": 1,
        "errors": 1,
        "skipped": 2,
        "passed": 3,
    }
    assert counts["failed"] == ["tests.test_trial::test_a", "tests.test_norm_paths::test_b[x]"]


def _row(cl: bool, bm: bool, plain: float, trial: float, augment: str = "none") -> dict:
    return {
        "channels_last": cl,
        "cudnn_benchmark": bm,
        "augment": augment,
        "plain_images_per_s": plain,
        "trial_images_per_s": trial,
    }


def test_which_flag_helps():
    rows = [
        _row(False, False, 100, 90),
        _row(False, True, 110, 90),
        _row(True, False, 130, 89),
        _row(True, True, 143, 92),
        _row(False, False, None, 10, augment="crop_flip"),  # not a twin of anything
    ]
    plain = gpu_check.flag_effects(rows, "plain_images_per_s")
    assert plain["channels_last"]["speedup"] == pytest.approx(1.3) and plain["channels_last"]["verdict"] == "helps"
    assert plain["cudnn_benchmark"]["speedup"] == pytest.approx(1.1) and plain["channels_last"]["pairs"] == 2
    trial = gpu_check.flag_effects(rows, "trial_images_per_s")
    assert trial["channels_last"]["verdict"] == "no clear effect"
    assert gpu_check.flag_effects([_row(False, False, 100, 1), _row(True, False, 80, 1)])["channels_last"][
        "verdict"
    ] == ("hurts")
    cpu_rows = [_row(False, False, 100, 1), _row(True, False, 100, 1)]  # no cudnn.benchmark rows on the CPU
    assert set(gpu_check.flag_effects(cpu_rows)) == {"channels_last"}


def test_the_amp_verdict():
    good = {"scale": 32768.0, "growth_factor": 2.0, "_growth_tracker": 3}
    verdict = gpu_check.amp_verdict("cuda", [good, good], ["torch.float16"], [2.0, 1.5], 0.8, 0.82, 10)
    assert verdict["ok"] and verdict["scales"] == [32768.0, 32768.0]
    bad_scale = gpu_check.amp_verdict("cuda", [good, {"scale": math.inf}], ["torch.float16"], [2.0, 1.5], 0.8, 0.8, 10)
    assert not bad_scale["ok"] and not bad_scale["checks"]["scaler"]
    off = gpu_check.amp_verdict("cuda", [{}, {}], ["torch.float16"], [2.0], 0.8, 0.8, 10)  # scaler off on CUDA
    assert not off["checks"]["scaler"]
    assert not gpu_check.amp_verdict("cuda", [good], ["torch.float32"], [2.0], 0.8, 0.8, 10)["checks"]["autocast_dtype"]
    cpu = gpu_check.amp_verdict("cpu", [{}, {}], ["torch.bfloat16"], [2.0, 1.9], 0.4, 0.4, 10)
    assert cpu["ok"] and cpu["scaler_expected"] == "disabled"
    assert not gpu_check.amp_verdict("cpu", [good], ["torch.bfloat16"], [2.0], 0.4, 0.4, 10)["checks"]["scaler"]
    nan = gpu_check.amp_verdict("cpu", [{}], ["torch.bfloat16"], [2.0, math.nan], 0.4, 0.4, 10)
    assert not nan["checks"]["losses_finite"]
    assert not gpu_check.amp_verdict("cpu", [{}], ["torch.bfloat16"], [2.0], 0.15, 0.15, 10)["checks"]["accuracy"]
    assert not gpu_check.amp_verdict("cpu", [{}], ["torch.bfloat16"], [2.0], 0.5, 0.7, 10)["checks"]["accuracy"]
    assert not gpu_check.amp_verdict("cpu", [], [], [], None, 0.7, 10)["ok"]  # the trial failed


def test_the_search_files_are_what_normlab_submit_reads(tmp_path):
    sizes = gpu_check.sizes_for(cuda=True, quick=True)
    result = gpu_check.run_searches(tmp_path, tmp_path, sizes, tmp_path / "data", "robustnorm", run=False)
    assert result["ok"] and result["ran"] is False and set(result["searches"]) == {"0.25", "1"}
    for share, search in result["searches"].items():
        assert search["validated"] == {
            "name": gpu_check.search_name(float(share)),
            "trials": 4,
            "resources": {"cpu": gpu_check.cpus_per_trial(), "gpu": float(share)},
        }
        space = gpu_check.search_space(
            "x",
            gpu=0.25,
            cpu=2,
            data_dir=Path("rel"),
            epochs=2,
            train_subset=64,
            test_subset=48,
            batch_size=32,
            trials=4,
            norm="none",
        )
        assert Path(space["fixed"]["data_dir"]).is_absolute()  # trials run in folders of their own
        assert "device" not in space["fixed"]  # auto: cuda with a GPU share
        assert space["fixed"]["epoch_adv_samples"] <= 48 and space["grid"] == {"seed": [0, 1, 2, 3]}
    assert gpu_check.search_name(0.25) == "gpucheck-gpu025" and gpu_check.search_name(1.0) == "gpucheck-gpu1"


def test_the_summary_table():
    figures = {
        "steps": {
            "tests": {"tests": 12, "passed": 11, "failures": 1, "errors": 0, "skipped": 0, "ok": False},
            "amp": {
                "train_dtypes": ["torch.float16"],
                "scales": [65536.0, 32768.0],
                "amp_clean_acc": 0.8,
                "fp32_clean_acc": 0.81,
                "checks": {"losses_finite": True, "scaler": True},
                "ok": True,
            },
            "norms": {"error": "AttributeError: module 'bench_norms' has no attribute 'make_steps'", "ok": False},
            "throughput": {
                "rows": [_row(False, False, 100.0, 90.0) | {"trial_over_plain": 0.9}],
                "effects_plain": {"channels_last": {"speedup": 1.2, "verdict": "helps"}},
            },
            "search": {
                "searches": {
                    "0.25": gpu_check.search_rate([(0.0, 100.0)] * 4, 150.0) | {"ok": True},
                    "1": gpu_check.search_rate([(100.0 * i, 100.0 * (i + 1)) for i in range(4)], 450.0) | {"ok": True},
                },
                "packing_speedup": 4.0,
            },
        }
    }
    table = gpu_check.format_table(gpu_check.summary_rows(figures))
    lines = table.splitlines()
    assert lines[0].split() == ["step", "what", "figure", "verdict"] and set(lines[1]) <= {"-", " "}
    assert "11 passed, 1 failed, 0 errors, 0 skipped" in table and "FAILED" in table
    assert "torch.float16, on, scale 32768" in table and "0.800 / 0.810" in table
    assert "no attribute 'make_steps'" in table
    assert "trial 90 / plain 100 img/s" in table and "x1.20" in table
    assert "4 trials, 144 /h (96 /h wall)" in table and "4 trials, 36 /h (32 /h wall)" in table
    assert "packing speedup" in table and "x4.00" in table


def test_arguments():
    args = gpu_check.parse_args([])
    assert args.out == gpu_check.DEFAULT_OUT and not args.quick and args.skip == [] and args.threads is None
    args = gpu_check.parse_args(["--quick", "--out", "x", "--skip", "search", "tests", "--norm", "robustnorm"])
    assert args.quick and args.out == Path("x") and args.skip == ["search", "tests"] and args.norm == "robustnorm"
    for bad in (["--skip", "everything"], ["--threads", "0"], ["--norm", "nonorm"]):
        with pytest.raises(SystemExit):
            gpu_check.parse_args(bad)
    assert gpu_check.sizes_for(cuda=True, quick=True).search_epochs <= gpu_check.sizes_for(True, False).search_epochs


@pytest.mark.slow
def test_the_search_step_submits_a_real_search_and_reads_its_rate(tmp_path):
    """Step 5's plumbing with a CPU search (``gpu: 0``): normlab submit, Ray's results, MLflow's devices."""
    sizes = gpu_check.sizes_for(cuda=False, quick=True)
    data = gpu_check.write_cifar_shape_folder(tmp_path / "data", sizes.train_images, sizes.test_images)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    result = gpu_check.run_searches(tmp_path, tmp_path, sizes, data, "batchnorm", run=True, shares=(0.0,), trials=2)
    search = result["searches"]["0"]
    assert result["ok"], Path(search["log"]).read_text()[-3000:]
    assert search["returncode"] == 0 and search["trials"] == 2 and search["finished"] == 2
    assert search["devices"] == {"cpu": 2}
    assert search["trials_per_hour"] > 0 and 0 < search["makespan_s"] <= search["wall_s"]
    assert search["median_trial_train_images_per_s"] > 0
    assert result["packing_speedup"] is None  # one share: nothing to compare
