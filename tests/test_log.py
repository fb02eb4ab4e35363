"""The tracking log under failed writes and damaged files: a failed write leaves no trace (in the
file, the eigenvector side file or the tracker's memory) and the step can be retried; readers skip
a damaged line with a warning instead of refusing the file.

Failures are simulated without filling a disk: os.write is made to write part of its bytes and
raise ENOSPC, a rename or truncation is made to raise EROFS, and (on Linux) RLIMIT_FSIZE makes the
kernel itself cut a write short.
"""

import errno
import json
import os
import sys
import warnings

import pytest
import torch
from torch import nn

from hessian_eigenthings import SharpnessRecord, SharpnessTracker, TrackingLogWriteError, read_log
from hessian_eigenthings.tracking import TrackingLog
from helpers import classification_data, small_mlp

F = nn.functional


@pytest.fixture
def problem():
    x, y = classification_data(num=48)
    return small_mlp(width=4), [(x, y)]


def make_record(step, k=2, **extras):
    return SharpnessRecord(step=step, eigenvalues=[3.0 + step, 1.5][:k], residuals=[1e-6, 2e-6][:k],
                           converged=[True, True][:k], products=20 + step, seconds=0.25, warm=step > 0,
                           which="LA", extras={"loss": 1.0 / (step + 1), **extras})


def vectors_step(path):
    return torch.load(path.with_name(path.name + ".vectors.pt"), weights_only=True)["step"]


def no_warnings_read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return read_log(path)


class FailingWrites:
    """While ``armed``, os.write to the file at ``target`` writes ``part`` of its bytes and raises
    ``OSError(code)`` (or ``exc``, an exception to raise instead)."""

    def __init__(self, monkeypatch, target, code=errno.ENOSPC, part=0.5, exc=None):
        self.target, self.code, self.part, self.exc = str(target), code, part, exc
        self.armed, self.failures = True, 0
        self.real_write = os.write
        monkeypatch.setattr(os, "write", self.write)

    def hits(self, fd):
        try:
            target = os.stat(self.target)
        except FileNotFoundError:
            return False
        stat = os.fstat(fd)
        return (stat.st_dev, stat.st_ino) == (target.st_dev, target.st_ino)

    def write(self, fd, data):
        if not (self.armed and self.hits(fd)):
            return self.real_write(fd, data)
        self.failures += 1
        self.real_write(fd, bytes(data[: int(len(data) * self.part)]))
        raise self.exc if self.exc is not None else OSError(self.code, os.strerror(self.code))


# -- 1. a failed write keeps nothing, and the step is retried ----------------------------------
@pytest.mark.parametrize("suffix, first_fails", [(".jsonl", False), (".csv", False), (".csv", True)])
def test_a_short_write_on_a_full_disk_is_undone_and_retried(problem, tmp_path, monkeypatch, suffix, first_fails):
    model, loader = problem
    path = tmp_path / f"run{suffix}"
    tracker = SharpnessTracker(model, loader, F.cross_entropy, num_eigenthings=2, log_path=path)
    if not first_fails:
        tracker.step(0)
    before, vectors_before = path.read_bytes(), tracker.eigenvectors
    disk = FailingWrites(monkeypatch, path)
    with pytest.raises(TrackingLogWriteError, match="No space left") as info:
        tracker.step(1)
    assert info.value.errno == errno.ENOSPC and disk.failures == 1
    message = str(info.value)
    assert str(path) in message and "cut back to its last complete record" in message and "step(1)" in message
    # nothing of step 1 anywhere: the file, the side file, the tracker's records and warm start
    assert path.read_bytes() == before
    assert [r.step for r in tracker.records] == ([] if first_fails else [0])
    assert tracker.eigenvectors is vectors_before
    if not first_fails:
        assert vectors_step(path) == 0
    assert not path.with_name(path.name + ".vectors.pt.tmp").exists()
    # space is back: the same step is measured again, and the whole log reads back without a warning
    disk.armed = False
    assert tracker.step(1, force=True).step == 1
    back = no_warnings_read(path)
    assert [r.as_dict() for r in back] == [r.as_dict() for r in tracker.records]
    assert [r.step for r in back] == ([1] if first_fails else [0, 1]) and vectors_step(path) == 1
    if suffix == ".csv":
        assert path.read_text().count("step,which,") == 1  # the header, once


def test_the_eigenvectors_are_written_before_the_record_and_undone_with_it(problem, tmp_path, monkeypatch):
    model, loader = problem
    path = tmp_path / "run.jsonl"
    side = path.with_name("run.jsonl.vectors.pt")
    tracker = SharpnessTracker(model, loader, F.cross_entropy, log_path=path)
    tracker.step(0)
    before, side_before = path.read_bytes(), side.read_bytes()

    # the temporary vectors file fills the disk: the record is not written at all
    disk = FailingWrites(monkeypatch, side.with_name(side.name + ".tmp"))
    with pytest.raises(TrackingLogWriteError, match="eigenvectors"):
        tracker.step(1)
    assert disk.failures == 1 and path.read_bytes() == before and side.read_bytes() == side_before
    assert tracker.last_step == 0 and not side.with_name(side.name + ".tmp").exists()
    disk.armed = False

    # the side file cannot be replaced (a read-only remount) after the line was written: the line goes
    def read_only_replace(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "replace", read_only_replace)
    with pytest.raises(TrackingLogWriteError, match="Read-only") as info:
        tracker.step(1)
    assert "replacing" in str(info.value)
    assert path.read_bytes() == before and side.read_bytes() == side_before and tracker.last_step == 0
    monkeypatch.undo()
    assert tracker.step(1).step == 1 and vectors_step(path) == 1
    assert [r.step for r in no_warnings_read(path)] == [0, 1]


def test_a_log_that_cannot_be_cut_back_at_once_is_cut_before_the_next_record(tmp_path, monkeypatch):
    path = tmp_path / "run.jsonl"
    log = TrackingLog(path)
    log.append(make_record(0))
    before = path.read_bytes()
    disk = FailingWrites(monkeypatch, path)
    real_ftruncate = os.ftruncate

    def read_only_ftruncate(fd, length):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(os, "ftruncate", read_only_ftruncate)
    with pytest.raises(TrackingLogWriteError, match="could not be cut back yet"):
        log.append(make_record(1))
    assert len(path.read_bytes()) > len(before)  # the half line is still there
    monkeypatch.setattr(os, "ftruncate", real_ftruncate)
    disk.armed = False
    log.append(make_record(1))
    log.close()
    assert [r.as_dict() for r in no_warnings_read(path)] == [make_record(0).as_dict(), make_record(1).as_dict()]


def test_ctrl_c_in_the_middle_of_a_write_is_undone_and_not_wrapped(tmp_path, monkeypatch):
    path = tmp_path / "run.csv"
    with TrackingLog(path) as log:
        log.append(make_record(0))
        before = path.read_bytes()
        disk = FailingWrites(monkeypatch, path, part=0.3, exc=KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            log.append(make_record(1))
        assert path.read_bytes() == before
        disk.armed = False
        log.append(make_record(1))
    assert [r.step for r in no_warnings_read(path)] == [0, 1]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_a_read_only_folder_keeps_the_record_out_of_log_and_memory(problem, tmp_path):
    model, loader = problem
    folder = tmp_path / "logs"
    folder.mkdir()
    path = folder / "run.jsonl"
    tracker = SharpnessTracker(model, loader, F.cross_entropy, log_path=path)
    tracker.step(0)
    before = path.read_bytes()
    folder.chmod(0o555)
    try:
        if os.access(folder, os.W_OK):
            pytest.skip("running as root: a read-only folder is still writable")
        with pytest.raises(TrackingLogWriteError, match="Permission denied"):
            tracker.step(1)
    finally:
        folder.chmod(0o755)
    assert path.read_bytes() == before and tracker.last_step == 0 and vectors_step(path) == 0
    assert tracker.step(1).warm and [r.step for r in no_warnings_read(path)] == [0, 1]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE short writes as on Linux")
@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_short_write_cut_by_the_kernel_is_undone(problem, tmp_path, suffix):
    """A file size limit makes the kernel take part of a write and refuse the rest (EFBIG), as a
    disk that fills up mid-line does; no patched function is involved."""
    resource = pytest.importorskip("resource")
    model, loader = problem
    path = tmp_path / f"run{suffix}"
    tracker = SharpnessTracker(model, loader, F.cross_entropy, log_path=path, save_vectors=False)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    for step in (0, 1):  # the first record (with the CSV header), then a later one
        before = path.read_bytes() if path.exists() else b""
        resource.setrlimit(resource.RLIMIT_FSIZE, (len(before) + 40, hard))
        try:
            with pytest.raises(OSError):
                tracker.step(step)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert path.read_bytes() == before and len(tracker.records) == step
        assert tracker.step(step).step == step
    back = no_warnings_read(path)
    assert [r.as_dict() for r in back] == [r.as_dict() for r in tracker.records] and len(back) == 2


def test_a_record_a_csv_cannot_hold_is_refused_before_anything_is_written(tmp_path):
    path = tmp_path / "run.csv"
    with TrackingLog(path) as log:
        log.append(make_record(0))
        before = path.read_bytes()
        with pytest.raises(ValueError, match="lacks"):
            log.append(make_record(1, extra=2.0))
        assert path.read_bytes() == before
        log.append(make_record(1))
    assert [r.step for r in no_warnings_read(path)] == [0, 1]


def test_a_csv_refuses_extra_names_with_line_breaks(tmp_path):
    path = tmp_path / "run.csv"
    with TrackingLog(path) as log:
        with pytest.raises(ValueError, match="line breaks"):
            log.append(make_record(0, **{"two\nlines": 1.0}))
        log.append(make_record(0))
    assert [r.step for r in no_warnings_read(path)] == [0]


def test_resume_ignores_vectors_newer_than_the_last_record(problem, tmp_path):
    model, loader = problem
    path = tmp_path / "run.jsonl"
    with SharpnessTracker(model, loader, F.cross_entropy, log_path=path) as tracker:
        tracker.step(0)
        tracker.step(1)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0])  # the record of step 1 lost, its vectors kept (an older writer)
    with SharpnessTracker(model, loader, F.cross_entropy, log_path=path, if_exists="resume") as resumed:
        assert resumed.last_step == 0 and resumed.eigenvectors is None
        assert not resumed.step(1).warm


# -- 2. readers skip a damaged line, and say which ---------------------------------------------
def test_a_damaged_jsonl_line_is_skipped_with_a_warning(tmp_path):
    path = tmp_path / "run.jsonl"
    good = [json.dumps(make_record(step).as_dict()) for step in range(4)]
    # line 2: a half line with the next record glued to it; line 4: not a record; last: cut short
    path.write_text(good[0] + "\n" + good[1][:30] + good[1] + "\n" + good[2] + "\n" + '{"a": 1}\n' + "[1, 2]\n"
                    + good[3] + "\n" + '{"step": Infinity, "eigenvalues": [1.0]}\n' + good[3][:25])
    with pytest.warns(UserWarning) as caught:
        records = read_log(path)
    assert [r.as_dict() for r in records] == [make_record(s).as_dict() for s in (0, 2, 3)]
    assert len(caught) == 1
    message = str(caught[0].message)
    assert str(path) in message
    for text in ("line 2: not JSON", "line 4: not a tracking record", "line 5: a JSON list",
                 "line 7: not a tracking record", "line 8: cut short"):
        assert text in message, message
    assert path.read_text().endswith(good[3][:25])  # reading changes nothing


def test_damaged_csv_rows_are_skipped_and_a_second_header_is_followed(tmp_path):
    path = tmp_path / "run.csv"
    with TrackingLog(path) as log:
        for step in range(3):
            log.append(make_record(step))
    header, row0, row1, row2 = path.read_text().splitlines()
    other_header = header.replace(",loss", ",loss,note")
    path.write_text("\n".join([
        header, row0,
        row1[:12] + row1,          # line 3: a cut row with the next one glued to it
        '"' + row1[:9],            # line 4: an open quote must not swallow the lines after it
        row1,
        "1,LA,x,y,1,0,nan,1,0,0,1,1,0",  # line 6: the right width but no numbers
        other_header,              # line 7: a second header (two writers), its rows have one more column
        row2 + ",7",
        row2[:10],                 # line 9: cut short
    ]))
    with pytest.warns(UserWarning) as caught:
        records = read_log(path)
    assert [r.step for r in records] == [0, 1, 2]
    assert records[2].extras == {"loss": make_record(2).extras["loss"], "note": 7}
    message = str(caught[0].message)
    for text in ("cells for 13 columns", "line 3:", "line 4:", "line 6: not a tracking record",
                 "line 7: a second CSV header", "line 9: cut short"):
        assert text in message, message
    assert "line 5" not in message and "line 8" not in message


def test_a_file_without_any_record_is_still_refused(tmp_path):
    path = tmp_path / "notes.jsonl"
    path.write_text('{"lr": 0.1}\n{"lr": 0.2}\n')
    with pytest.raises(ValueError, match="none of its lines is a tracking record"):
        read_log(path)
    csv_path = tmp_path / "table.csv"
    csv_path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="row before any header"):
        read_log(csv_path)
    (tmp_path / "empty.csv").write_text("")
    assert read_log(tmp_path / "empty.csv") == []


def test_resume_skips_a_damaged_line_and_appends_after_it(problem, tmp_path):
    model, loader = problem
    path = tmp_path / "run.jsonl"
    with SharpnessTracker(model, loader, F.cross_entropy, log_path=path) as tracker:
        for step in range(3):
            tracker.step(step)
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[1][:40] + lines[1] + lines[2] + lines[2][:20])
    with pytest.warns(UserWarning, match="line 2: not JSON.*line 4: cut short.*removed from the file"):
        resumed = SharpnessTracker(model, loader, F.cross_entropy, log_path=path, if_exists="resume")
    assert [r.step for r in resumed.records] == [0, 2] and resumed.step(3).warm
    resumed.close()
    with pytest.warns(UserWarning, match="line 2: not JSON"):
        assert [r.step for r in read_log(path)] == [0, 2, 3]
