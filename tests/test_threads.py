"""The CPU thread oversubscription check: when it fires, what it says, and that it warns once."""

import os
import warnings

import pytest
import torch

import hessian_eigenthings
from hessian_eigenthings import threads as threads_module
from hessian_eigenthings.threads import ThreadOversubscriptionWarning, thread_oversubscription, usable_cpus


def test_one_thread_never_oversubscribes():
    assert thread_oversubscription("cpu", threads=1, cpus=1, processes=8, load=100.0, machine_cpus=1) is None


def test_more_threads_than_usable_cpus_is_reported_with_what_to_set():
    reason = thread_oversubscription("cpu", threads=4, cpus=2, processes=1, load=0.0, machine_cpus=64)
    assert reason is not None
    assert "4 threads" in reason and "only 2 CPU" in reason and "torch.set_num_threads" in reason


def test_threads_that_fit_on_an_idle_machine_are_fine():
    assert thread_oversubscription("cpu", threads=2, cpus=2, processes=1, load=1.9, machine_cpus=2) is None
    assert thread_oversubscription(None, threads=8, cpus=16, processes=2, load=3.0, machine_cpus=16) is None


def test_ranks_on_one_machine_count_together():
    reason = thread_oversubscription("cpu", threads=2, cpus=2, processes=2, load=0.0, machine_cpus=2)
    assert reason is not None and "2 processes x 2 threads" in reason


def test_a_busy_machine_is_reported():
    # 2 threads on 2 cores, but 6 runnable tasks over the last minute: other jobs take the cores
    reason = thread_oversubscription("cpu", threads=2, cpus=2, processes=1, load=6.0, machine_cpus=2)
    assert reason is not None and "busy" in reason and "6.0" in reason
    # the process itself, two threads flat out on two cores, is not "busy"
    assert thread_oversubscription("cpu", threads=2, cpus=2, processes=1, load=2.5, machine_cpus=2) is None


def test_cuda_products_are_not_checked():
    assert thread_oversubscription("cuda", threads=64, cpus=1, processes=1, load=0.0, machine_cpus=1) is None
    assert thread_oversubscription(torch.device("cuda", 0), threads=64, cpus=1) is None


def test_usable_cpus_is_capped_by_a_container_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # cgroup v2: 1.5 CPUs
    assert usable_cpus(tmp_path) == min(affinity, 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path) == affinity
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1: 1 CPU
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(tmp_path) == 1
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")  # no quota
    assert usable_cpus(tmp_path) == affinity
    assert usable_cpus(tmp_path / "missing") == affinity


def test_check_warns_once_per_process_and_points_at_the_caller(monkeypatch):
    monkeypatch.setattr(threads_module, "_warned", False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(threads_module, "usable_cpus", lambda: 2)
    with pytest.warns(ThreadOversubscriptionWarning, match="8 threads") as record:
        reason = hessian_eigenthings.check_cpu_threads("cpu")
    assert record[0].filename == __file__
    assert reason is not None and "8 threads" in reason
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hessian_eigenthings.check_cpu_threads("cpu") == reason  # reported again, not warned again
        assert hessian_eigenthings.check_cpu_threads("cuda") is None


def test_check_is_silent_when_threads_fit(monkeypatch):
    monkeypatch.setattr(threads_module, "_warned", False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert hessian_eigenthings.check_cpu_threads() is None
    assert threads_module._warned is False
