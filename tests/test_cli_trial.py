"""`normlab trial`: the researcher's command line, run as a real subprocess."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from trainables.config import TrialConfig

NORMLAB = [sys.executable, "-m", "orchestrator.cli"]


def normlab(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*NORMLAB, *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_trial_prints_epochs_and_table_and_writes_json(tmp_path):
    out = tmp_path / "result.json"
    proc = normlab(
        "trial",
        "dataset=digits",
        "model=cnn",
        "norm=robustnorm",
        "norm_power=0.2",
        "regime=pgd_at",
        "epochs=2",
        "eval_attacks=fgsm,pgd",
        "eval_eps=0.05,0.1",
        "train_subset=512",
        "threads=2",
        "--json-out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    assert "epoch 1/2" in proc.stdout and "epoch 2/2" in proc.stdout and "adv_acc" in proc.stdout
    assert "final accuracy" in proc.stdout and "eps 0.05" in proc.stdout and "pgd" in proc.stdout
    result = json.loads(out.read_text())
    assert result["config"]["norm"] == "robustnorm" and result["config"]["norm_power"] == 0.2
    assert [m["epoch"] for m in result["history"]] == [1, 2]
    for key in (
        "adv_acc_fgsm_eps0.05",
        "adv_acc_fgsm_eps0.1",
        "adv_acc_pgd_eps0.05",
        "adv_acc_pgd_eps0.1",
        "final_clean_acc",
        "final_adv_acc",
        "adv_acc_pgd_eps0.1_batchstats",
    ):
        assert 0.0 <= result["final"][key] <= 1.0, key
    assert result["eval_batch_size"] == 256


def test_config_file_checkpoints_and_resume(tmp_path):
    cfg = tmp_path / "trial.yaml"
    cfg.write_text("epochs: 2\ntrain_subset: 256\neval_attacks: [fgsm]\neval_eps: [0.1]\nthreads: 1\n")
    ckpt = tmp_path / "ckpt"
    first = normlab(
        "trial", "--config", str(cfg), "--checkpoint-dir", str(ckpt), "--json-out", str(tmp_path / "a.json")
    )
    assert first.returncode == 0, first.stderr
    assert (ckpt / "last.pt").is_file()
    again = normlab(
        "trial", "--config", str(cfg), "--checkpoint-dir", str(ckpt), "--resume", "--json-out", str(tmp_path / "b.json")
    )
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stderr
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert b["resumed_from_epoch"] == 2 and b["final"] == a["final"]


def test_help_lists_every_knob_with_its_default():
    proc = normlab("trial", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for name in TrialConfig.model_fields:
        assert f"{name}=" in text, name
    assert "norm_power=0.2" in text and "eval_attacks=fgsm,pgd" in text and "dataset=digits" in text


def test_bad_input_is_exit_code_2_with_field_and_choices(tmp_path):
    proc = normlab("trial", "norm=robustnrom", "epochs=0")
    assert proc.returncode == 2
    assert "norm: unknown norm 'robustnrom'; known: batchnorm" in proc.stderr
    assert "epochs: Input should be greater than 0" in proc.stderr
    assert "Traceback" not in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("- not a mapping\n")
    proc = normlab("trial", "--config", str(bad))
    assert proc.returncode == 2 and "expected a mapping" in proc.stderr
    proc = normlab("trial", "epochs")
    assert proc.returncode == 2 and "KEY=VALUE" in proc.stderr


def test_a_failing_trial_says_why_without_a_traceback(tmp_path):
    proc = normlab(
        "trial",
        "epochs=3",
        "train_subset=256",
        "lr=1e12",
        "momentum=0",
        "weight_decay=0",
        "eval_attacks=fgsm",
        "eval_eps=[0.1]",
        "--checkpoint-dir",
        str(tmp_path),
    )
    err = " ".join(proc.stderr.split())
    assert proc.returncode == 1 and "Traceback" not in err
    assert re.search(r"trial failed: NonFiniteLossError: non-finite training loss \(\w+\) at epoch \d, step \d/2", err)
    proc = normlab("trial", "regime=bn_finetune_adv", f"init_from={tmp_path / 'nope.pt'}")
    assert proc.returncode == 1 and "checkpoint not found" in proc.stderr and "nope.pt" in proc.stderr
