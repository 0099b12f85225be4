"""What makes a small search fast must not change what it measures.

A slot's trials run one after the other in the same Ray worker (``reuse_actors``), which
imported what trials need as it started (``orchestrator.running.warmup``). A real search
on one slot: every trial ran in that one worker, and each trial's numbers are exactly
those of the same configuration run alone in a fresh ``run_trial``, so nothing leaks from
one trial to the next (random state, threads, statistic modes, the optimizer). The spans
``NORMLAB_PROFILE`` asks for (``trainables.profiling``) are there for the benchmark.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
from conftest import run_normlab

from orchestrator.running.tuner import TrialResolver
from orchestrator.searchfile.load import load_space
from trainables.profiling import read_spans

SPACE = """
name: reuse
fixed: {dataset: digits, model: cnn, epochs: 2, train_subset: 256, test_subset: 128, batch_size: 64,
        eval_attacks: [fgsm], eval_eps: [0.1], epoch_adv_samples: 64, final_adv_samples: 64, seed: 3}
grid:
  norm: [robustnorm, batchnorm]
  regime: [pgd_at, standard]
search: {algorithm: grid, metric: adv_acc, mode: max}
resources: {cpu: 1}
max_failures: 0
checkpoint: {every: 1, keep: 1}
"""


@pytest.fixture(scope="module")
def reused(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("reuse")
    (workdir / "reuse.yaml").write_text(textwrap.dedent(SPACE))
    spans = workdir / "spans"
    spans.mkdir()
    proc = run_normlab("submit", "reuse.yaml", "--num-cpus", "1", cwd=workdir, NORMLAB_PROFILE=str(spans))
    assert proc.returncode == 0, proc.stderr[-4000:]
    trials = sorted((workdir / "normlab_runs" / "ray_results").glob("reuse-*/train_*"))
    results = {t.name: [json.loads(line) for line in (t / "result.json").read_text().splitlines()] for t in trials}
    return workdir, results, read_spans(spans)


def test_one_slot_runs_every_trial_in_one_warmed_up_worker(reused):
    _, results, spans = reused
    assert len(results) == 4
    pids = {rows[-1]["pid"] for rows in results.values()}
    assert len(pids) == 1, pids  # reuse_actors: the slot's worker ran them all
    (pid,) = pids
    warm = [s for s in spans if s["span"] == "worker.warm_up" and s["pid"] == pid]
    assert len(warm) == 1  # imported once, as the worker started
    prepared = sorted(s["start"] for s in spans if s["span"] == "trial.prepare" and s["pid"] == pid)
    assert len(prepared) == 4 and warm[0]["end"] <= prepared[0]
    # every epoch of every trial is in the spans the benchmark reads, under its trial's name
    trained = {(s["trial"], s["epoch"]) for s in spans if s["span"] == "trial.train"}
    assert trained == {("_".join(folder.split("_")[:3]), e) for folder in results for e in (1, 2)}


def _alive(pid: int) -> bool:
    """A process that runs (a zombie, dead but not yet reaped by its new parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def test_the_local_ray_ends_with_the_command(reused):
    """The command leaves its local Ray without Ray's graceful shutdown (``cli.common.leave``):
    every process of it must still be gone once the command has exited."""
    if not Path("/proc/self/stat").exists():
        pytest.skip("no /proc here")
    _, results, spans = reused
    (driver,) = {s["pid"] for s in spans if s["span"] == "driver.start"}
    worker = next(iter(results.values()))[-1]["pid"]
    session = re.compile(rf"session_[0-9_-]+_{driver}(/|\b)")  # Ray names its session after the driver's pid

    def in_session(proc: Path) -> bool:
        """Named after the session, or (Ray's agents retitle themselves "ray::...") with a file
        of the session's folder open."""
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if session.search(cmdline):
                return True
            return any(session.search(os.readlink(fd)) for fd in (proc / "fd").iterdir())
        except OSError:
            return False

    def left() -> list[int]:
        pids = []
        for proc in Path("/proc").glob("[0-9]*"):
            if (int(proc.name) == worker or in_session(proc)) and _alive(int(proc.name)):
                pids.append(int(proc.name))
        return pids

    deadline = time.time() + 15
    while left() and time.time() < deadline:
        time.sleep(0.5)
    assert not left(), [Path(f"/proc/{p}/cmdline").read_bytes() for p in left()]


def test_the_local_ray_starts_no_worker_that_runs_no_trial(reused):
    """Ray would start an idle worker per CPU as the driver connects; Tune's trial actors (a
    runtime_env of their own) never run in one (``connect.init_ray`` turns that off): on
    one slot, the raylet starts exactly the one worker that ran the four trials."""
    _, _, spans = reused
    (driver,) = {s["pid"] for s in spans if s["span"] == "driver.start"}
    # Ray names a session's folder by its date and the driver's pid; pids are reused (32768 of
    # them on a small VM), so an earlier session may share the suffix: this search's is the newest
    logs = Path(tempfile.gettempdir(), "ray").glob(f"session_*_{driver}/logs/raylet.out")
    raylet_log = max(logs, key=lambda p: p.parent.parent.name)
    started = re.findall(r"Started worker process with pid (\d+)", raylet_log.read_text())
    assert len(started) == 1, started


def test_a_reused_worker_gives_each_trial_the_numbers_of_a_fresh_run(reused):
    """Compare each trial with the same configuration run alone in this process (1 thread, as Ray gave it)."""
    import torch

    from trainables.trial import run_trial

    workdir, results, _ = reused
    space, _ = load_space(str(workdir / "reuse.yaml"))
    resolve = TrialResolver(space.fixed)
    threads = torch.get_num_threads()
    try:
        for name, rows in results.items():
            params = json.loads(
                (next(workdir.glob(f"normlab_runs/ray_results/reuse-*/{name}")) / "params.json").read_text()
            )
            alone = run_trial({**resolve(params), "threads": 1, "device": "cpu"})
            for row, epoch in zip(rows, alone.history, strict=True):
                for key in ("train_loss", "clean_acc", "adv_acc"):
                    assert row[key] == pytest.approx(epoch[key], abs=1e-6), (name, key, row["epoch"])
            assert rows[-1]["final_adv_acc"] == pytest.approx(alone.final["final_adv_acc"], abs=1e-6), name
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ the parts, alone


def test_spans_are_written_only_when_asked_and_survive_a_raising_block(tmp_path, monkeypatch):
    from trainables import profiling

    monkeypatch.delenv(profiling.ENV, raising=False)
    with profiling.span("off"):
        pass
    monkeypatch.setenv(profiling.ENV, str(tmp_path))
    profiling.set_context(trial="t1")
    with pytest.raises(ValueError), profiling.span("boom", epoch=2):
        raise ValueError
    profiling.record("earlier", 10.0, 12.5)
    (tmp_path / "spans-1.jsonl").write_text('{"span": "cut", "start": 1')  # a killed process's last line
    spans = read_spans(tmp_path)
    profiling.set_context()
    assert [s["span"] for s in spans] == ["earlier", "boom"]
    assert spans[0]["end"] - spans[0]["start"] == 2.5 and spans[0]["trial"] == "t1"
    assert spans[1]["epoch"] == 2 and spans[1]["end"] >= spans[1]["start"]


def test_the_benchmark_accounts_for_every_second_of_the_wall_time(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench_search import breakdown, slots_of

    def s(name, start, end, pid):
        return {"span": name, "start": start, "end": end, "pid": pid}

    driver, a, b = 1, 2, 3
    spans = [
        s("driver.start", -0.5, 0.5, driver),
        s("driver.ray_start", 0.5, 3.5, driver),
        s("driver.imports", 0.8, 1.5, driver),  # in a thread while Ray starts: counted once, as Ray start
        s("driver.tracking", 1.5, 4.5, driver),  # 1 s of it after Ray started
        s("driver.fit", 5.0, 25.0, driver),
        s("worker.boot", 3.0, 4.0, a),
        s("worker.warm_up", 4.0, 7.0, a),  # 2 s of it inside the fit
        s("trial.prepare", 7.0, 8.0, a),
        s("trial.tracking", 7.5, 8.0, a),  # nested in prepare: counted once, as MLflow
        s("trial.train", 8.0, 20.0, a),
        s("trial.train", 6.0, 24.0, b),
        s("driver.finish", 25.0, 26.0, driver),
    ]
    parts = breakdown(spans, started=0.0, ended=27.0, slots=2)
    assert sum(parts.values()) == pytest.approx(27.0)
    assert parts["driver imports"] == pytest.approx(0.5)
    assert parts["Ray start"] == pytest.approx(3.0) and parts["MLflow set-up (store, search run)"] == pytest.approx(1.0)
    assert parts["driver: other before the trials"] == pytest.approx(0.5)
    assert parts["worker start (process, warm-up imports)"] == pytest.approx(2.0 / 2)
    assert parts["trial set-up (run, data, model)"] == pytest.approx(0.5 / 2)
    assert parts["MLflow logging"] == pytest.approx(0.5 / 2)
    assert parts["training"] == pytest.approx((12 + 18) / 2)
    assert parts["slot time no trial used"] == pytest.approx((40 - 2 - 0.5 - 0.5 - 30) / 2)
    assert parts["end of search (summary, report)"] == 1.0 and parts["exit"] == pytest.approx(1.0)
    assert slots_of(6, 2, 1) == 2 and slots_of(1, 8, 1) == 1 and slots_of(6, 1, 2) == 1


def test_the_benchmark_bounds_the_efficiency_by_the_cpu_the_machine_spent(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from bench_search import busy_cpu_seconds, cpu_ceiling

    # 39 s of trial compute on 2 slots; the machine was busy 60 CPU-s on 2 cores: at least 30 s of wall
    assert cpu_ceiling(39.0, 2, 60.0, 2) == pytest.approx(19.5 / 30.0)
    assert cpu_ceiling(39.0, 2, 30.0, 2) == 1.0 and cpu_ceiling(39.0, 2, None, 2) is None
    before = busy_cpu_seconds()
    if before is None:
        pytest.skip("no /proc/stat here")
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:  # burn 0.3 s of CPU
        pass
    assert busy_cpu_seconds() - before >= 0.25


def test_warm_up_never_raises_and_imports_what_trials_need(monkeypatch, tmp_path):
    import subprocess
    import sys

    from orchestrator.running import warmup
    from trainables.data import DATASETS, loader_modules

    assert set(warmup.MODULES) >= {"trainables.ray_trainable", "torchattacks"}
    assert all(name in DATASETS for name in ("digits", "cifar10", "imagefolder")) and loader_modules("nope") == ()
    code = (
        "import sys; from orchestrator.running import warmup; "
        "warmup.MODULES = warmup.MODULES + ('no_such_module_here',); warmup.warm_up(); "
        "assert 'torchattacks' in sys.modules and 'sklearn.model_selection' in sys.modules; print('ok')"
    )
    env = {"NORMLAB_WARM_UP_DATASETS": "digits,not_a_dataset", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_a_search_knows_every_dataset_its_trials_load(tmp_path):
    (tmp_path / "s.yaml").write_text(
        "name: s\nfixed: {model: cnn}\ngrid: {dataset: [digits, synthetic]}\nsample: {lr: {loguniform: [0.01, 0.1]}}\n"
        "search: {algorithm: random}\n"
    )
    space, _ = load_space(str(tmp_path / "s.yaml"))
    assert space.values_of("dataset") == ["digits", "synthetic"]
    assert space.values_of("lr") == [0.01, 0.1] and space.values_of("model") == ["cnn"]
    (tmp_path / "t.yaml").write_text("name: t\n")
    assert load_space(str(tmp_path / "t.yaml"))[0].values_of("dataset") == ["digits"]  # TrialConfig's default
