"""The benchmarks' one way of naming the device they ran on (a readable name for reports, a slug for file names),
and of telling how busy the host was while they ran.

    device_name("cpu")  → "AMD EPYC (2 cores)"      device_slug("cpu")  → "cpu-amd-epyc-2c"
    device_name("cuda") → "NVIDIA H200"             device_slug("cuda") → "nvidia-h200"

Results are named <benchmark>[_<variant>]_<slug>.{json,md}; thread counts, dtypes and the like belong in the
report, not in the name, so reruns on one machine replace its file.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

# Vendor marks and clock speeds say nothing about which machine it was: "Intel(R) Xeon(R) CPU @ 2.20GHz" → "Intel Xeon"
_CPU_NOISE = re.compile(r"\((R|TM)\)|\bCPU\b|\bProcessor\b|@.*$|\d+-Core", re.IGNORECASE)


def cpu_cores() -> int:
    """Cores this process may run on (a container's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    model = next((line.split(":", 1)[1] for line in lines if line.startswith("model name")), "unknown CPU")
    return " ".join(_CPU_NOISE.sub(" ", model).split()) or "unknown CPU"


def device_name(device: str) -> str:
    """"cuda" → the GPU's name as the driver gives it; "cpu" → the CPU model and the cores available."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({cpu_cores()} cores)"


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_slug(device: str) -> str:
    """Lowercase, single dashes: "nvidia-h200", "cpu-amd-epyc-2c"."""
    if device == "cuda":
        return slugify(device_name(device))
    return slugify(f"cpu {cpu_model()} {cpu_cores()}c")


def busy_cpu_s() -> float | None:
    """CPU seconds all other processes have used (system busy time minus this process's own and that of its
    finished children, e.g. compile workers), Linux only: taken before and after a benchmark, it says how loaded
    the host was (a loaded host is no headline number)."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    except OSError:
        return None
    import resource  # Unix only, like /proc/stat

    own = sum(u.ru_utime + u.ru_stime for u in map(resource.getrusage, (resource.RUSAGE_SELF,
                                                                          resource.RUSAGE_CHILDREN)))
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK") - own


def foreign_load(busy_before: float | None, seconds: float) -> float | None:
    """The share (%) of all the host's cores that other processes used over the last `seconds`, from busy_cpu_s()
    taken at their start; None where /proc/stat is not readable."""
    busy = busy_cpu_s()
    if busy is None or busy_before is None:
        return None
    return 100 * max(0.0, busy - busy_before) / (max(seconds, 1e-9) * (os.cpu_count() or 1))


def load_average() -> float | None:
    """The 1-minute load average; None where there is none (Windows)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None
