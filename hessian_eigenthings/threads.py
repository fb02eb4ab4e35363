"""A cheap check that torch's CPU threads fit the CPUs this process can actually get.

Hessian-vector products of small and medium models are short bursts of work that torch splits
over ``torch.get_num_threads()`` threads, which wait for each other at the end of every kernel.
When there are more threads than free cores (a container limited to fewer CPUs than the machine
has, several ranks on one machine, or a machine that other jobs keep busy), a thread that is not
scheduled stalls all the others: products then take tens of times longer than on one thread (a
solve on a shared 2-core machine ran 30x slower with torch's default threads). Nothing is wrong
with the results, so the check only warns, once per process, and says what to set.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

from .utils import logger, user_stacklevel

__all__ = ["ThreadOversubscriptionWarning", "usable_cpus", "thread_oversubscription", "check_cpu_threads"]


class ThreadOversubscriptionWarning(UserWarning):
    """torch runs more CPU threads than this process can have on a core at once."""


_CGROUP_ROOT = Path("/sys/fs/cgroup")
# How many runnable tasks above the machine's CPU count, averaged over the last minute, count as
# "busy": this process alone, with at most one thread per core, cannot push the load that high.
_BUSY_MARGIN = 1.0

_warned = False


def _cgroup_cpu_limit(root: Path = _CGROUP_ROOT) -> Optional[float]:
    """The CPU quota of this process's container in CPUs (cgroup v2 ``cpu.max`` or v1
    ``cpu.cfs_quota_us``), or None when there is none or it cannot be read."""
    try:
        text = (root / "cpu.max").read_text().split()
        if len(text) == 2 and text[0] != "max":
            return int(text[0]) / int(text[1])
        if text:
            return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cpus(cgroup_root: Path = _CGROUP_ROOT) -> int:
    """How many CPUs this process may run on at once: its CPU affinity (``os.sched_getaffinity``),
    capped by a container's CPU quota, at least 1."""
    if hasattr(os, "sched_getaffinity"):
        cpus = len(os.sched_getaffinity(0))
    else:
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_limit(cgroup_root)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def _local_processes() -> int:
    """Processes of one torch.distributed job on this machine (torchrun's ``LOCAL_WORLD_SIZE``), else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def _load_average() -> Optional[float]:
    """Runnable tasks on the whole machine, averaged over the last minute, or None where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def thread_oversubscription(
    device: Union[torch.device, str, None] = None,
    *,
    threads: Optional[int] = None,
    cpus: Optional[int] = None,
    processes: Optional[int] = None,
    load: Optional[float] = None,
    machine_cpus: Optional[int] = None,
) -> Optional[str]:
    """Why torch's CPU threads are more than the cores this process can get, or None if they fit.

    Args:
        device: where the products run; only a CPU device (or None, meaning the CPU) is checked,
            since CUDA kernels do not use torch's CPU thread pool.
        threads, cpus, processes, load, machine_cpus: what to judge, for tests; by default
            ``torch.get_num_threads()``, :func:`usable_cpus`, torchrun's ``LOCAL_WORLD_SIZE``, the
            one-minute load average and ``os.cpu_count()``.

    Returns:
        A sentence naming the cause and what to set, or None. With one thread there is nothing to
        oversubscribe and the answer is always None.
    """
    if device is not None and torch.device(device).type != "cpu":
        return None
    threads = torch.get_num_threads() if threads is None else threads
    if threads <= 1:
        return None
    cpus = usable_cpus() if cpus is None else cpus
    processes = _local_processes() if processes is None else processes
    advice = (
        "Call torch.set_num_threads(n) (or set OMP_NUM_THREADS=n before starting Python) with n at most the "
        f"free cores per process; n=1 is the safe choice for models of up to a few million parameters."
    )
    if threads * processes > cpus:
        who = f"{processes} processes x {threads} threads" if processes > 1 else f"{threads} threads"
        return (
            f"torch runs {who} on the CPU but this process may use only {cpus} CPU(s); threads that wait "
            f"for a core stall every product (a solve was measured 30x slower). {advice}"
        )
    load = _load_average() if load is None else load
    machine_cpus = (os.cpu_count() or 1) if machine_cpus is None else machine_cpus
    if load is not None and load > machine_cpus + _BUSY_MARGIN:
        return (
            f"torch runs {threads} threads on the CPU while the machine is busy (load average {load:.1f} on "
            f"{machine_cpus} CPU(s)); threads that wait for a core stall every product (a solve was measured "
            f"30x slower). {advice}"
        )
    return None


def check_cpu_threads(device: Union[torch.device, str, None] = None) -> Optional[str]:
    """Warn once per process (a :class:`ThreadOversubscriptionWarning`, also logged) when torch's CPU
    threads oversubscribe the cores, see :func:`thread_oversubscription`.

    Cheap (a few system calls, no products): meant to be called whenever an operator is set up to
    compute on ``device``. Silence it with
    ``warnings.filterwarnings("ignore", category=ThreadOversubscriptionWarning)``.

    Returns:
        The reason, every time the threads oversubscribe (also after the one warning), else None.
    """
    global _warned
    reason = thread_oversubscription(device)
    if reason is not None and not _warned:
        _warned = True
        logger.info(reason)
        warnings.warn(reason, ThreadOversubscriptionWarning, stacklevel=user_stacklevel())
    return reason
