"""Machine helpers shared by the benchmark scripts of ``bench/``: cores, CPU name, how busy the rest of the machine
was while we timed, peak memory, devices and versions.

Only the standard library is imported at module level, so that every script can use this module, whichever
interpreter runs it (the project's venv, the transformers 4.57 venv of ``bench_flax457.py``, a GPU machine's
preinstalled python). Functions that need jax or torch import them when called.

The scripts import it as ``import _machine``: ``python bench/x.py`` puts ``bench/`` first on ``sys.path``, and
``bertgen bench`` inserts it before running a script (the scripts also insert it themselves, see
``on_path`` below).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from typing import Any, Optional

NOISY_CORES = 0.2  # warn when other processes use more than this many cores while we time

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)


def on_path() -> None:
    """Puts ``bench/`` on ``sys.path`` (idempotent), for sibling imports under ``runpy.run_path``."""
    if BENCH_DIR not in sys.path:
        sys.path.insert(0, BENCH_DIR)


# ---- cores and CPU --------------------------------------------------------------------------------------------
def usable_cores() -> int:
    """Cores this process may run on (XLA's CPU thread pool sizes itself by the same affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_name(fallback: str = "unknown CPU") -> str:
    """The ``model name`` of ``/proc/cpuinfo``, else ``platform.processor()``, else ``fallback``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or fallback


# ---- how busy the rest of the machine was ---------------------------------------------------------------------
def machine_cpu_seconds() -> Optional[tuple[float, float]]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process), or None without /proc/stat."""
    try:
        with open("/proc/stat", encoding="utf-8") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
    except (OSError, ValueError):
        return None
    busy = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
    return busy / os.sysconf("SC_CLK_TCK"), time.process_time()


def other_cores(before: Optional[tuple[float, float]], after: Optional[tuple[float, float]],
                wall_s: float) -> Optional[float]:
    """Average cores that other processes (or the hypervisor: steal) kept busy over ``wall_s`` seconds, from two
    ``machine_cpu_seconds()`` readings."""
    if before is None or after is None or wall_s <= 0:
        return None
    machine, own = after[0] - before[0], after[1] - before[1]
    return max(0.0, machine - own) / wall_s


def warn_if_noisy(busiest: float, what: str = "timed calls") -> None:
    """The standard warning on stderr when other processes kept more than ``NOISY_CORES`` cores busy."""
    if busiest > NOISY_CORES:
        print(f"WARNING: other processes kept up to {busiest:.2f} cores busy during {what}: these timings "
              f"are unreliable; rerun on a quiet machine", file=sys.stderr)


# ---- memory ---------------------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    """This process's peak resident memory in MB. VmHWM, not ru_maxrss: Linux carries ru_maxrss over an exec, so
    a child process would report its (larger) parent's peak."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except (OSError, ValueError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def jax_peak_bytes() -> Optional[int]:
    """``peak_bytes_in_use`` of jax's first device since the process started (jax cannot reset it), or None
    where the backend keeps no statistics (the CPU)."""
    import jax
    stats = jax.devices()[0].memory_stats()
    return None if not stats else stats.get("peak_bytes_in_use")


def torch_reset_peak(device: str) -> None:
    """Starts a new peak for ``torch_peak_bytes`` (CUDA only)."""
    if device == "cuda":
        import torch
        torch.cuda.reset_peak_memory_stats()


def torch_peak_bytes(device: str) -> Optional[int]:
    """``torch.cuda.max_memory_allocated()`` since the last reset on CUDA, None on the CPU."""
    if device != "cuda":
        return None
    import torch
    return int(torch.cuda.max_memory_allocated())


# ---- devices --------------------------------------------------------------------------------------------------
def select_devices(choice: str) -> tuple[str, str]:
    """(torch device, jax backend) for ``--device auto|cpu|cuda``. Must run before jax initialises a backend."""
    import jax
    import torch
    cuda = torch.cuda.is_available()
    if choice == "cuda" and not cuda:
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if choice == "cpu":
        jax.config.update("jax_platforms", "cpu")
    torch_device = "cuda" if choice == "cuda" or (choice == "auto" and cuda) else "cpu"
    backend = jax.default_backend()
    if choice == "cuda" and backend != "gpu":
        raise SystemExit(f"--device cuda: jax's default backend is {backend!r}, not 'gpu'")
    return torch_device, backend


def select_jax_backend(choice: str) -> str:
    """jax's backend for ``--device auto|cpu|cuda`` without torch. Must run before jax initialises a backend."""
    import jax
    if choice == "cpu":
        jax.config.update("jax_platforms", "cpu")
    backend = jax.default_backend()
    if choice == "cuda" and backend != "gpu":
        raise SystemExit(f"--device cuda: jax's default backend is {backend!r}, not 'gpu'")
    return backend


# ---- versions and output --------------------------------------------------------------------------------------
def versions(*names: str) -> dict[str, str]:
    """``python`` and ``__version__`` of each named module that imports (missing ones are left out)."""
    out = {"python": platform.python_version()}
    for name in names:
        try:
            module = __import__(name)
        except Exception:  # noqa: BLE001 - a missing or broken optional module is simply not reported
            continue
        out[name] = str(getattr(module, "__version__", "?"))
    return out


def now_iso() -> str:
    import datetime
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def write_json(path: str, payload: Any) -> None:
    """Writes ``payload`` as indented JSON, creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2)
