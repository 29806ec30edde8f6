"""CPU threads and OpenMP waiting: good manners on a shared CPU (issue 16).

Threads: torch's intra-op pool and the native kernel's OpenMP team (kernels/cpu_quant.py) get EngineConfig.threads,
by default the physical cores this process may use (its affinity mask, one CPU per core: SMT siblings share a
core's vector units, so a second thread per core only adds barrier waits).

Neighbours: a decode step is ~150 OpenMP parallel regions, each ending in a barrier that needs every thread of
the team on a core. Beside a busy process (another engine, a build) one thread of the team is often queued behind
it, and the others spin at the barrier: each region then waits out a scheduler slice (several times slower, far
more beside another spinning engine: BENCHMARKS.md, shared CPU). Passive waiting alone (OMP_WAIT_POLICY=PASSIVE)
fixes that but costs a futex wake per region when running alone. So CpuShare sizes the native kernel's
team from the CPU time other processes take on our CPUs, measured as the engine steps: a busy neighbour on one of
2 cores leaves hearthlm one thread, which never waits for another.

Spinning: libgomp's workers spin 300,000 `pause` rounds before they sleep (tens of milliseconds): after every
step, idle or not, they burn CPU that a neighbour could use. libgomp reads its policy once, when it loads (when
torch is imported), so `import hearthlm` sets GOMP_SPINCOUNT=SPIN_COUNT (a spin still longer than the gaps between
one step's regions, far shorter than libgomp's) before torch loads: only when torch is not imported yet and
the user set neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT (theirs win). An engine started after an earlier
`import torch` logs how to get it.
"""
from __future__ import annotations

import functools
import logging
import math
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("hearthlm")

# libgomp spin rounds before a waiting thread sleeps (a round is one `pause`: 10-140 ns on current x86): covers the
# gaps between the parallel regions of a decode step, not a neighbour's scheduler slice
SPIN_COUNT = 20000
SYSFS_CPU = Path("/sys/devices/system/cpu")
WAIT_ENV = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
# the GOMP_SPINCOUNT value `import hearthlm` put in os.environ, until libgomp has read it (then it is removed, so
# that child processes start with the user's environment); bounded[0]: libgomp runs with our bound
_ours: list[str] = []
_bounded = [False]


def set_wait_policy(environ=os.environ, modules=sys.modules) -> str | None:
    """Bound OpenMP spin-waiting for the libgomp that torch will load: GOMP_SPINCOUNT=SPIN_COUNT in `environ`,
    only if torch is not imported yet (libgomp reads it once, when it loads) and the user set no wait policy.
    Returns the value set, or None (left alone). Called at `import hearthlm`; imports nothing heavy."""
    if "torch" in modules or any(k in environ for k in WAIT_ENV):
        return None
    environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    if environ is os.environ:
        _ours.append(environ["GOMP_SPINCOUNT"])
    return environ["GOMP_SPINCOUNT"]


def forget_wait_policy() -> None:
    """Once torch (and so libgomp) is loaded, take back the GOMP_SPINCOUNT that `import hearthlm` set: libgomp
    read it when it loaded, and processes this one starts should not inherit it."""
    if _ours and "torch" in sys.modules:
        if os.environ.get("GOMP_SPINCOUNT") == _ours[0]:
            del os.environ["GOMP_SPINCOUNT"]
            _bounded[0] = True
        _ours.clear()


def _cpu_list(text: str) -> set[int]:
    """'0-3,8' -> {0, 1, 2, 3, 8}"""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def allowed_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity mask), or all of os.cpu_count()."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def physical_cores(cpus: set[int] | None = None, sysfs: Path = SYSFS_CPU) -> int:
    """How many physical cores `cpus` (default: allowed_cpus()) span: CPUs that are SMT siblings (sysfs
    topology/thread_siblings_list, else package and core_id) count once; a CPU without topology counts alone."""
    cpus = allowed_cpus() if cpus is None else set(cpus)
    cores: set = set()
    for cpu in cpus:
        topo = sysfs / f"cpu{cpu}" / "topology"
        try:
            siblings = _cpu_list((topo / "thread_siblings_list").read_text())
            cores.add(("siblings", min(siblings & cpus or siblings)))
            continue
        except (OSError, ValueError):
            pass
        try:
            package = (topo / "physical_package_id").read_text().strip()
            cores.add(("core", package, (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", cpu))
    return max(1, len(cores)) if cpus else max(1, os.cpu_count() or 1)


def default_threads() -> int:
    """EngineConfig.threads=None: the physical cores this process may use."""
    return physical_cores()


def apply_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads and the native kernel's OpenMP team to `threads`, on the calling thread
    (OpenMP keeps the count per thread: call it on the thread that steps the engine). None: default_threads(),
    or fewer where torch was set to fewer already (torch.set_num_threads, OMP_NUM_THREADS). Returns the count."""
    import torch

    forget_wait_policy()
    n = int(threads) if threads else min(default_threads(), torch.get_num_threads())
    _set_counts(n)
    log.debug("CPU threads: %d (torch and the native kernel)", n)
    if n > 1 and not _bounded[0] and not any(k in os.environ for k in WAIT_ENV):
        _note_spinning()
    return n


def _cpu_busy_ticks(cpus: set[int], stat: Path) -> int:
    """Clock ticks the CPUs `cpus` spent busy (user, nice, system, irq, softirq, steal) since boot, all processes."""
    total = 0
    for line in stat.read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *fields = line.split()
            if int(name[3:]) in cpus:
                v = [int(f) for f in fields[:8]]
                total += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
    return total


def _own_ticks(self_stat: Path) -> int:
    """Clock ticks this process (all its threads) ran, user + system."""
    fields = self_stat.read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


class CpuShare:
    """The engine's CPU threads, fewer while other processes keep this process's CPUs busy.

    A team of N threads needs all N on a core at every barrier: beside a busy neighbour one of them waits out the
    neighbour's scheduler slice at each of a decode step's ~150 parallel regions (measured 7x to 40x slower on 2
    cores, llama.cpp alike). So every `interval_s` of stepping (checked once a step) the CPU time that others
    took on our CPUs (/proc/stat's busy time minus our own) sets the native kernel's team (its ~150 regions a
    step): our CPUs minus the others' load rounded up (a 0.2-core noise floor; 0.05 to grow again), between 1 and
    `threads`. Its results do not depend on the count (each thread computes whole tiles and attention rows;
    tests/test_threads.py). torch's count stays as set: a dense matmul's bits can depend on it (MKL splits)."""

    def __init__(self, threads: int, cpus: set[int] | None = None, interval_s: float = 0.1,
                 proc: Path = Path("/proc")):
        self.max_threads = self.threads = threads
        self.cpus = allowed_cpus() if cpus is None else cpus
        self.interval_s = interval_s
        self._stat, self._self_stat = proc / "stat", proc / "self" / "stat"
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._last: tuple[float, int, int] | None = None
        self.others_cores = 0.0  # the last window's load of other processes on our CPUs

    def target(self, others_cores: float) -> int:
        n = max(1, min(self.max_threads, len(self.cpus) - max(0, math.ceil(others_cores - 0.2))))
        if n > self.threads:  # hysteresis: more threads only once the others' load is clearly gone
            n = max(self.threads, min(n, len(self.cpus) - max(0, math.ceil(others_cores - 0.05))))
        return n

    def poll(self, now: float | None = None) -> int | None:
        """Called once a step: the new thread count when it changed (and applied), else None."""
        if self.max_threads <= 1:
            return None
        now = time.monotonic() if now is None else now
        if self._last is not None and now - self._last[0] < self.interval_s:
            return None
        try:
            sample = (now, _cpu_busy_ticks(self.cpus, self._stat), _own_ticks(self._self_stat))
        except (OSError, ValueError, IndexError):
            self.max_threads = self.threads  # no /proc here: a fixed count
            return None
        last, self._last = self._last, sample
        if last is None:  # (a window that spans idle time counts too: a neighbour busy then likely still is)
            return None
        self.others_cores = max(0, (sample[1] - last[1]) - (sample[2] - last[2])) / self._hz / (now - last[0])
        n = self.target(self.others_cores)
        if n == self.threads:
            return None
        log.info("CPU threads: %d -> %d (other processes use %.1f of this process's %d CPUs)", self.threads, n,
                 self.others_cores, len(self.cpus))
        self.threads = n
        _set_kernel_threads(n)
        return n


def _set_kernel_threads(n: int) -> None:
    from ..kernels import cpu_quant

    cpu_quant.set_threads(n)


def _set_counts(n: int) -> None:
    import torch

    from ..kernels import cpu_quant

    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    cpu_quant.set_threads(n)


def start_threads(threads: int | None = None) -> CpuShare:
    """apply_threads, and the CpuShare that adapts the native kernel's count (at most that many) as neighbours
    come and go."""
    return CpuShare(apply_threads(threads))


@functools.cache
def _note_spinning() -> None:
    log.info("torch was imported before hearthlm, so OpenMP threads keep libgomp's long spin-wait: beside other "
             "busy processes generation can be many times slower; import hearthlm first or set "
             "OMP_WAIT_POLICY=PASSIVE before starting Python")


__all__ = ["SPIN_COUNT", "CpuShare", "allowed_cpus", "apply_threads", "default_threads", "physical_cores",
           "forget_wait_policy", "set_wait_policy", "start_threads"]
