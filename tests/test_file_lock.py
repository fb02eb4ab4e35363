"""One writer per tracking log: a second tracker on the same file, in this process or another, is
refused while the first holds it, and accepted (resuming it) once the first is closed, left by a
``with`` block or garbage-collected. Readers need no lock; ranks other than 0 take none."""

import errno
import gc
import multiprocessing
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from hessian_eigenthings import SharpnessRecord, SharpnessTracker, TrackingLogInUseError, read_log
from hessian_eigenthings.tracking import TrackingLog, file_lock
from helpers import classification_data, small_mlp

F = nn.functional


@pytest.fixture
def problem():
    x, y = classification_data(num=48)
    return small_mlp(width=4), [(x, y)], x, y


def make_record(step):
    return SharpnessRecord(step=step, eigenvalues=[3.0, 1.5], residuals=[1e-6, 2e-6], converged=[True, True],
                           products=20, seconds=0.25, warm=True, which="LA", extras={"loss": 0.5, "grad_norm": 0.1})


def tracker(problem, path, **kwargs):
    model, loader, _, _ = problem
    return SharpnessTracker(model, loader, F.cross_entropy, num_eigenthings=2, log_path=path, **kwargs)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_second_tracker_in_this_process_is_refused_until_the_first_is_closed(problem, tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    side = path.with_name(path.name + ".vectors.pt")
    first = tracker(problem, path)
    first.step(0)
    content, vectors = path.read_bytes(), side.read_bytes()
    for if_exists in ("resume", "overwrite"):
        with pytest.raises(TrackingLogInUseError) as info:
            tracker(problem, path, if_exists=if_exists)
        message = str(info.value)
        assert str(path) in message and "in this process" in message and "close" in message
    with pytest.raises(FileExistsError, match="if_exists='resume'"):
        tracker(problem, path)
    # the same file by another name, and the bare log class, are refused too
    if sys.platform != "win32":
        os.symlink(path, tmp_path / f"link{suffix}")
        with pytest.raises(TrackingLogInUseError):
            TrackingLog(tmp_path / f"link{suffix}", if_exists="resume")
    with pytest.raises(TrackingLogInUseError):
        TrackingLog(os.path.relpath(path), if_exists="overwrite")
    # a refused writer changed nothing, and reading needs no lock
    assert path.read_bytes() == content and side.read_bytes() == vectors
    assert [r.step for r in read_log(path)] == [0]
    first.step(1)
    first.close()
    first.close()  # twice is fine
    with tracker(problem, path, if_exists="resume") as second:
        assert [r.step for r in second.records] == [0, 1] and second.step(2).warm
    back = read_log(path)  # a CSV log keeps a single header
    assert [r.as_dict() for r in back] == [r.as_dict() for r in first.records + second.records[2:]]


def test_a_with_block_garbage_collection_and_a_failed_resume_release_the_file(problem, tmp_path):
    path = tmp_path / "run.jsonl"
    with tracker(problem, path) as first:
        first.step(0)
    assert first.closed
    with pytest.raises(RuntimeError, match="closed"):
        first.step(1)
    dropped = tracker(problem, path, if_exists="resume")
    dropped.step(1)
    del dropped
    gc.collect()
    with pytest.raises(ValueError, match="Cannot resume"):
        SharpnessTracker(problem[0], problem[1], F.cross_entropy, num_eigenthings=3, log_path=path, if_exists="resume")
    with tracker(problem, path, if_exists="resume") as again:
        assert again.last_step == 1


def test_close_detaches_from_the_optimizer(problem, tmp_path):
    model, loader, x, y = problem
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    path = tmp_path / "run.jsonl"
    tracked = tracker(problem, path)
    tracked.attach(optimizer)
    for _ in range(2):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    tracked.close()
    optimizer.step()  # no hook left to call the closed tracker
    assert [r.step for r in read_log(path)] == [1, 2]
    with pytest.raises(RuntimeError, match="closed"):
        tracked.attach(optimizer)


def test_an_empty_log_counts_as_absent(tmp_path):
    path = tmp_path / "run.jsonl"
    TrackingLog(path).close()
    assert not path.exists()  # created, nothing written: removed on close
    path.touch()
    with TrackingLog(path) as log:  # if_exists="error" accepts an empty file
        log.append(make_record(0))
    assert path.exists() and [r.step for r in read_log(path)] == [0]


def _second_process(path, inherited, conn):
    """Runs in a forked child: opens, appends to and closes the log when told, and reports back."""
    log = None
    while True:
        command, arg = conn.recv()
        if command == "append_inherited":  # the parent's log object, copied by the fork
            try:
                inherited.append(make_record(arg))
            except RuntimeError as exc:
                conn.send(("refused", str(exc)))
            continue
        if command == "open":
            try:
                log = TrackingLog(path, if_exists="resume")
            except TrackingLogInUseError as exc:
                conn.send(("refused", str(exc)))
                continue
            conn.send(("open", [r.step for r in log.resumed]))
        elif command == "append":
            log.append(make_record(arg))
            conn.send(("appended", arg))
        elif command == "close":
            log.close()
            conn.send(("closed", None))
        else:
            return


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_a_second_process_is_refused_until_the_first_closes(problem, tmp_path):
    path = tmp_path / "run.jsonl"
    first = tracker(problem, path)
    first.step(0)
    # forked now, the child shares the parent's open file; closing in the parent must still release it
    ctx = multiprocessing.get_context("fork")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=_second_process, args=(str(path), first.log, child_conn), daemon=True)
    child.start()

    def ask(command, arg=None):
        conn.send((command, arg))
        assert conn.poll(60), "the second process did not answer"
        return conn.recv()

    try:
        answer, message = ask("open")
        assert answer == "refused" and str(path) in message and "another process" in message
        answer, message = ask("append_inherited", 5)
        assert answer == "refused" and "forked child" in message
        first.close()
        assert ask("open") == ("open", [0])
        with pytest.raises(TrackingLogInUseError, match="another process"):
            tracker(problem, path, if_exists="resume")
        assert ask("append", 7) == ("appended", 7)
        assert ask("close") == ("closed", None)
    finally:
        conn.send(("exit", None))
        child.join(30)
    assert child.exitcode == 0
    with tracker(problem, path, if_exists="resume") as resumed:
        assert [r.step for r in resumed.records] == [0, 7]
        assert resumed.step(8).warm
    assert [r.step for r in read_log(path)] == [0, 7, 8]


@pytest.mark.slow
def test_a_separate_interpreter_is_refused_until_the_first_closes(problem, tmp_path):
    """As above with a fresh interpreter (nothing inherited); slow for its torch import."""
    path = tmp_path / "run.csv"
    script = textwrap.dedent(f"""
        import sys
        from hessian_eigenthings.tracking import TrackingLog, TrackingLogInUseError
        for attempt in range(2):
            try:
                with TrackingLog({str(path)!r}, if_exists="resume") as log:
                    print("open", [r.step for r in log.resumed], flush=True)
            except TrackingLogInUseError as exc:
                print("refused", exc, flush=True)
            sys.stdin.readline()
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    first = tracker(problem, path)
    first.step(0)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True, env=env)
    try:
        line = child.stdout.readline()
        assert line.startswith("refused") and "another process" in line, line
        first.close()
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "open [0]"
        child.stdin.write("\n")
        child.stdin.flush()
    finally:
        child.communicate(timeout=60)
    assert child.returncode == 0


def test_ranks_other_than_zero_take_no_lock_and_write_nothing(tmp_path, monkeypatch):
    path = tmp_path / "run.jsonl"
    with TrackingLog(path) as writer:
        writer.append(make_record(0))
        monkeypatch.setattr("hessian_eigenthings.distributed.is_main_process", lambda: False)
        other_rank = TrackingLog(path, if_exists="resume")
        assert [r.step for r in other_rank.resumed] == [0] and not other_rank.closed
        other_rank.append(make_record(1))
        other_rank.close()
    assert [r.step for r in read_log(path)] == [0]


@pytest.mark.skipif(file_lock.fcntl is None, reason="fcntl.flock")
def test_a_file_system_without_locks_keeps_writers_in_this_process_apart(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))  # as some network file systems answer

    monkeypatch.setattr(file_lock.fcntl, "flock", no_locks)
    path = tmp_path / "run.jsonl"
    with pytest.warns(UserWarning, match="does not support locks"):
        first = TrackingLog(path)
    with pytest.raises(TrackingLogInUseError, match="in this process"):
        TrackingLog(path, if_exists="resume")
    first.append(make_record(0))
    first.close()
    with pytest.warns(UserWarning, match="does not support locks"):
        with TrackingLog(path, if_exists="resume") as again:
            assert [r.step for r in again.resumed] == [0]
