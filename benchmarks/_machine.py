"""What every benchmark reports about the machine it ran on, and its JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def minor_faults() -> int:
    """Minor page faults of this process so far: each first touch of memory the allocator got
    afresh from the kernel (zeroed, mapped), several microseconds apiece on a VM."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def write_json(path: Path, benchmark: str, **figures: object) -> None:
    """The figures of one benchmark run, with torch version, threads and CPU model."""
    import torch

    out = {
        "benchmark": benchmark,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        **figures,
    }
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")
