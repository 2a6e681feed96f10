"""What this machine's CPUs are and which this process may use, read without torch: fields of
/proc/cpuinfo (vendor, flags), the CPU affinity and a cgroup's CPU quota."""

from __future__ import annotations

import math
import os
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")
ROOT = Path("/")  # (where /proc and /sys/fs/cgroup are found; tests give another)


def cpu_field(name: str, cpuinfo: Path | None = None) -> str:
    """Field ``name`` of the first CPU in ``cpuinfo`` (default /proc/cpuinfo), e.g.
    ``vendor_id``; empty when it cannot be read."""
    try:
        text = (cpuinfo or CPUINFO).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def usable_cpus(root: Path | None = None) -> int:
    """The CPUs this process may use: its affinity (taskset, a cgroup's cpuset), where the
    system keeps one, else all of the machine's, and at most its cgroup's CPU quota."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # (macOS, Windows)
        cpus = os.cpu_count() or 1
    quota = cpu_quota(root)
    return min(cpus, quota) if quota else cpus


def cpu_quota(root: Path | None = None) -> int | None:
    """The CPUs that the CPU quota of this process's cgroup, or of a cgroup above it, allows
    (a container's ``--cpus``, Kubernetes' CPU limit), rounded up; None where none is set or
    none can be read. cgroup v2's ``cpu.max``, v1's ``cpu.cfs_quota_us`` over
    ``cpu.cfs_period_us``."""
    root = root or ROOT
    try:
        lines = (root / "proc/self/cgroup").read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # the v2 hierarchy
            mounts = [root / "sys/fs/cgroup", root / "sys/fs/cgroup/unified"]
        elif "cpu" in controllers.split(","):
            mounts = [root / "sys/fs/cgroup" / controllers, root / "sys/fs/cgroup/cpu"]
        else:
            continue
        for mount in mounts:
            # In a container the hierarchy mounted is its own: the path, as the host names
            # it, may not exist there, and the mount's top is the container's cgroup.
            directory = mount / path.strip("/")
            for level in [directory, *directory.parents]:
                if level == mount.parent:
                    break
                quotas.append(_quota_of(level, v2=controllers == ""))
    found = [quota for quota in quotas if quota]
    return min(found) if found else None


def _quota_of(directory: Path, v2: bool) -> int | None:
    """The CPU quota set on one cgroup ``directory``, in whole CPUs rounded up, or None."""
    try:
        if v2:
            quota, period = (directory / "cpu.max").read_text(encoding="utf-8").split()[:2]
        else:
            quota = (directory / "cpu.cfs_quota_us").read_text(encoding="utf-8").strip()
            period = (directory / "cpu.cfs_period_us").read_text(encoding="utf-8").strip()
        if quota in ("max", "-1"):
            return None
        return max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError, ZeroDivisionError):
        return None


def cap_torch_threads() -> None:
    """Run torch's default thread count at most at the cgroup's CPU quota: torch counts the
    machine's cores, so in a container allowed 2 CPUs of 64 it ran 64 threads, taking turns
    on 2. A count the user gives (``train.threads``, ``--threads``) is set later and wins."""
    quota = cpu_quota()
    if quota:  # (torch is imported only where a quota is set)
        import torch

        if quota < torch.get_num_threads():
            torch.set_num_threads(quota)


def threads_problem(option: str, threads: int, processes: int, which: str, work: str,
                    cpus: int | None = None) -> str | None:
    """What is wrong with ``processes`` processes running ``threads`` threads each (set by
    ``option``; ``which`` says what the processes are) on the CPUs this process may use
    (``cpus``, default :func:`usable_cpus`): None when they fit, else a warning's text.
    Threads beyond the CPUs take turns, so ``work`` (training, decoding) gets slower."""
    cpus = usable_cpus() if cpus is None else cpus
    if threads * processes <= cpus:  # (0 threads: torch's default, capped at the CPUs)
        return None
    each = f" in each of {processes} {which}" if processes > 1 else ""
    return (f"{option}: {threads} threads{each} for the {cpus} CPU{'s' if cpus > 1 else ''} "
            f"this process may use: threads beyond the CPUs wait for one another and slow "
            f"{work}; set at most {max(1, cpus // processes)}")

