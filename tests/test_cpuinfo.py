"""The CPUs a process may use: affinity and a cgroup's CPU quota (seq2seq/cpuinfo.py), read
from a made-up /proc and /sys/fs/cgroup."""

import os

import pytest
import torch

from seq2seq import cpuinfo
from seq2seq.cli import main
from seq2seq.cpuinfo import cap_torch_threads, cpu_quota, usable_cpus
from tests.conftest import REPO


def machine(tmp_path, cgroup, files):
    """A root holding ``proc/self/cgroup`` and the cgroup files ``files`` (path: text)."""
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for path, text in files.items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    return tmp_path


@pytest.mark.parametrize("cgroup, files, cpus", [
    # cgroup v2, a container's own hierarchy: 1.5 CPUs allow 2 threads
    ("0::/\n", {"sys/fs/cgroup/cpu.max": "150000 100000\n"}, 2),
    ("0::/\n", {"sys/fs/cgroup/cpu.max": "max 100000\n"}, None),
    # a service's cgroup under a slice whose quota is the smaller
    ("0::/a.slice/b.service\n", {"sys/fs/cgroup/a.slice/cpu.max": "300000 100000",
                                 "sys/fs/cgroup/a.slice/b.service/cpu.max": "800000 100000"}, 3),
    # cgroup v1, named as the host names it, mounted as the container's own
    ("12:cpu,cpuacct:/docker/4f2a\n3:memory:/docker/4f2a\n",
     {"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "200000\n",
      "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 2),
    ("1:cpu:/\n", {"sys/fs/cgroup/cpu/cpu.cfs_quota_us": "-1\n",
                   "sys/fs/cgroup/cpu/cpu.cfs_period_us": "100000\n"}, None),
    # a quota below one CPU still runs one thread; garbage and missing files are no quota
    ("0::/\n", {"sys/fs/cgroup/cpu.max": "20000 100000"}, 1),
    ("0::/\n", {"sys/fs/cgroup/cpu.max": "lots 0"}, None),
    ("0::/x\n", {}, None),
])
def test_the_cpu_quota_of_a_cgroup_and_those_above_it(tmp_path, cgroup, files, cpus):
    assert cpu_quota(machine(tmp_path, cgroup, files)) == cpus


def test_no_cgroup_file_is_no_quota(tmp_path):
    assert cpu_quota(tmp_path) is None


def test_usable_cpus_are_the_affinity_capped_by_the_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(tmp_path) == affinity
    root = machine(tmp_path, "0::/\n", {"sys/fs/cgroup/cpu.max": "100000 100000"})
    assert usable_cpus(root) == 1
    root.joinpath("sys/fs/cgroup/cpu.max").write_text(f"{100000 * (affinity + 4)} 100000")
    assert usable_cpus(root) == affinity


def test_torch_threads_by_default_are_capped_at_the_quota(monkeypatch):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        monkeypatch.setattr(cpuinfo, "cpu_quota", lambda root=None: 8)
        cap_torch_threads()
        assert torch.get_num_threads() == 4  # (a larger quota adds no thread)
        monkeypatch.setattr(cpuinfo, "cpu_quota", lambda root=None: None)
        cap_torch_threads()
        assert torch.get_num_threads() == 4
        monkeypatch.setattr(cpuinfo, "cpu_quota", lambda root=None: 2)
        cap_torch_threads()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_every_command_runs_torch_at_most_at_the_quota(tmp_path, monkeypatch):
    root = machine(tmp_path / "root", "0::/\n", {"sys/fs/cgroup/cpu.max": "100000 100000"})
    monkeypatch.setattr(cpuinfo, "ROOT", root)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        recipe = str(REPO / "recipes/quickstart.yaml")
        assert main(["check", recipe, f"output_dir={tmp_path / 'run'}"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
