"""The one timing harness of the benchmarks (``throughput.py``, ``gpu_check.py``): warm-up, then timed repetitions
of a step, each synchronised with the device (CUDA work is asynchronous: without the synchronisation the clock
would stop before the GPU finishes), and the step's peak memory; with the machine's description for the JSON."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass
class Timing:
    """What :func:`time_steps` measured: ``first_s`` (seconds of the first call: start-up, compilation),
    ``times_s`` (seconds of each timed call, sorted ascending), ``peak_mib`` and ``memory`` (how the peak was
    measured: see :func:`peak_mib`) and ``last`` (what the last timed call returned)."""

    first_s: float
    times_s: list[float]
    peak_mib: float
    memory: str
    last: Any

    @property
    def median_s(self) -> float:
        """The median timed call (the upper one of an even count), seconds."""
        return self.times_s[len(self.times_s) // 2]

    @property
    def best_s(self) -> float:
        """The fastest timed call, seconds: the better estimate on a shared machine."""
        return self.times_s[0]


def sync(device: torch.device) -> None:
    """Wait until the device has finished the work queued so far (CUDA); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], device: torch.device, warmup: int, steps: int) -> Timing:
    """Call ``step`` ``warmup`` times untimed, then ``steps`` times timed, each call between two device
    synchronisations. ``first_s`` is the first call's seconds (start-up, compilation; with ``warmup = 0`` it is
    also the first timed call); the peak memory is that of the timed calls.

    Raises:
        ValueError: ``warmup < 0`` or ``steps < 1``.
    """
    if warmup < 0 or steps < 1:
        raise ValueError(f"time_steps needs warmup >= 0 and steps >= 1, got warmup={warmup}, steps={steps}.")
    sync(device)
    seconds: list[float] = []
    rss, last = vm_mib("VmRSS"), None
    for call in range(warmup + steps):
        if call == warmup:  # the timed calls start: their peak memory only
            rss = vm_mib("VmRSS")
            reset_peak(device)
        start = time.perf_counter()
        last = step()
        sync(device)
        seconds.append(time.perf_counter() - start)
    peak = peak_mib(device, rss)
    return Timing(seconds[0], sorted(seconds[warmup:]), peak["peak_mib"], peak["memory"], last)


# ------------------------------------------------------------------------------------------------ memory
def vm_mib(key: str) -> float:
    """A /proc/self/status field in MiB (VmRSS, VmHWM); nan where unavailable."""
    with contextlib.suppress(OSError, StopIteration):
        line = next(ln for ln in Path("/proc/self/status").read_text().splitlines() if ln.startswith(key + ":"))
        return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak(device: torch.device) -> None:
    """Start a new peak-memory measurement: CUDA's peak statistics, or the process's peak RSS (Linux >= 4.0)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def peak_mib(device: torch.device, rss_before: float) -> dict[str, Any]:
    """``{"peak_mib", "memory"}``: CUDA's ``max_memory_allocated``, or on the CPU the peak RSS (VmHWM) above
    ``rss_before`` (MiB), with a line saying which."""
    if device.type == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20, "memory": "cuda max_memory_allocated"}
    return {
        "peak_mib": vm_mib("VmHWM") - rss_before,
        "memory": "CPU peak RSS (VmHWM) above the RSS before the step",
    }


# ------------------------------------------------------------------------------------------------ machine
def machine() -> dict[str, Any]:
    """The machine for the JSON: CPU model, cores, torch threads and version, Python, platform, memory, GPU."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    with contextlib.suppress(OSError, StopIteration):
        mem = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
        info["memory_gib"] = round(int(mem.split()[1]) / 2**20, 1)
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
