"""A trial's process keeps freed memory for its next step (``trainables.allocator``).

Measured where it matters, in the page faults of a ResNet-20 training step (batch 64,
CIFAR shapes) in a fresh process. With glibc's defaults the step frees its activations,
the freed top of the heap goes back to the kernel, and every step faults them in again;
after ``run_trial`` (or ``keep_freed_memory``) every step reuses the last one's memory.
Each case runs in its own process: the setting is process-wide and cannot be undone.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import normlab_env

CHILD = r"""
import resource, sys
import torch
import torch.nn.functional as F

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

how = sys.argv[1]
if how == "run_trial":
    from trainables.trial import run_trial
    run_trial(dict(dataset="digits", epochs=1, train_subset=64, test_subset=32, batch_size=32, eval_batch_size=32,
                   epoch_adv_samples=16, final_adv_samples=16, eval_attacks=["fgsm"], eval_eps=[0.1], threads=1))
elif how == "keep":
    from trainables.allocator import keep_freed_memory
    assert keep_freed_memory()
from trainables.models import create_model
torch.set_num_threads(1)
torch.manual_seed(0)
model = create_model("resnet20", num_classes=10, in_channels=3, norm_layer=torch.nn.BatchNorm2d)
opt = torch.optim.SGD(model.parameters(), lr=0.01)
x, y = torch.rand(64, 3, 32, 32), torch.randint(0, 10, (64,))

def step():
    before = faults()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return faults() - before

for _ in range(2):
    step()
print(sorted(step() for _ in range(7))[3])  # the median step: the heap may still grow in one or two
"""


CASES = {  # name: (how, extra environment)
    "glibc": ("nothing", {}),
    "keep": ("keep", {}),
    "run_trial": ("run_trial", {}),
    "run_trial, told not to": ("run_trial", {"NORMLAB_KEEP_FREED_MEMORY": "0"}),
}
KEPT, FAULTING = 1000, 4000  # page faults in the median step


@pytest.fixture(scope="module")
def faults() -> dict[str, float]:
    """Page faults in the median step of each case, each in a process of its own (all at once)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's malloc only")
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", CHILD, how],
            env=normlab_env(**env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, (how, env) in CASES.items()
    }
    out = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        out[name] = float(stdout.strip().splitlines()[-1])
    # about 10,000 pages of 4 KiB a step at batch 128 in benchmarks/bench_step.py
    assert out["glibc"] > FAULTING, f"glibc's defaults faulted only {out['glibc']} pages a step: nothing to measure"
    return out


def test_keeping_freed_memory_ends_the_page_faults_of_every_step(faults):
    assert faults["keep"] < KEPT, faults


def test_a_trial_keeps_freed_memory_unless_told_not_to(faults):
    assert faults["run_trial"] < KEPT, faults
    assert faults["run_trial, told not to"] > FAULTING, faults
