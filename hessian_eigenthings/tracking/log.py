"""The tracking record and its log file: JSON lines or CSV, appended and synced to disk per record.

The log never holds what did not happen, nor loses what did:

- Every record is one whole line, written and ``fsync``-ed before the tracker keeps the record, so
  a crash or Ctrl-C loses at most the record being measured.
- A write that fails (a full disk, a read-only file system) is undone: the file is cut back to
  the end of its last complete record, and the error is raised, so that the step can be retried.
- The last eigenvectors go to a side file ``<log>.vectors.pt``, written to a temporary file first
  and renamed over the old one only after the record's line is on disk, so that a record never
  points at vectors that were not written, nor vectors outlive a record that was not.
- The writer holds an exclusive lock on the file for its lifetime (:mod:`.file_lock`), so that a
  second writer, in this process or another, is refused instead of mixing its records in.
- Reading skips a damaged line (a last line cut short by a crash, anything that is not a record)
  with a warning naming the line, instead of refusing the whole file; a resume also cuts a
  partial last line from the file.
"""

from __future__ import annotations

import csv
import errno
import io
import json
import math
import os
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from .. import distributed
from ..utils import logger, user_stacklevel
from . import file_lock

PathLike = Union[str, "os.PathLike[str]"]
FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv"}
IF_EXISTS = ("error", "resume", "overwrite")
# fields every record has, in the order CSV writes them (lists are expanded to name_0, name_1, ...)
_SCALARS = ("step", "which", "products", "seconds", "warm", "preconditioned")
_LISTS = (("eigenvalues", "eigenvalue"), ("residuals", "residual"), ("converged", "converged"))
RECORD_FIELDS = _SCALARS + tuple(name for name, _ in _LISTS)


@dataclass
class SharpnessRecord:
    """One tracked step.

    Attributes:
        step: the training step (the caller's counter).
        eigenvalues: k eigenvalues, most extreme first in the sense of ``which`` (for "LA" the
            first is the sharpness).
        residuals: ``||A v - lambda v||`` of each pair (absolute).
        converged: whether each pair met the tracker's relative tolerance.
        products: operator-vector products the solve used (residual check included).
        seconds: wall-clock time of the tracked step (the solve and the extras).
        warm: whether the solve was warm-started from the previous eigenvectors.
        which: "LA", "SA" or "LM".
        preconditioned: whether the operator was ``P^{-1/2} H P^{-1/2}`` rather than ``H``.
        extras: the built-in extras ("loss", "grad_norm" by default; "trace" and "trace_std_error" on
            request) and whatever the extras hooks returned.
    """

    step: int
    eigenvalues: list[float]
    residuals: list[float]
    converged: list[bool]
    products: int
    seconds: float
    warm: bool
    which: str
    preconditioned: bool = False
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def sharpness(self) -> float:
        """The first eigenvalue (the largest for ``which="LA"``)."""
        return self.eigenvalues[0]

    def as_dict(self) -> dict[str, Any]:
        """A flat dict: the fields above, with the extras as top-level keys."""
        out = {name: getattr(self, name) for name in RECORD_FIELDS}
        out.update(self.extras)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SharpnessRecord":
        """The inverse of :meth:`as_dict`."""
        missing = [name for name in ("step", "eigenvalues") if name not in data]
        if missing:
            raise ValueError(f"Not a tracking record: it lacks {', '.join(missing)}.")
        k = len(data["eigenvalues"])
        return cls(
            step=int(data["step"]),
            eigenvalues=[float(v) for v in data["eigenvalues"]],
            residuals=[float(v) for v in data.get("residuals") or [math.nan] * k],
            converged=[bool(v) for v in data.get("converged") or [False] * k],
            products=int(data.get("products") or 0),
            seconds=float(data.get("seconds") or 0.0),
            warm=bool(data.get("warm", False)),
            which=str(data.get("which") or "LA"),
            preconditioned=bool(data.get("preconditioned", False)),
            extras={key: value for key, value in data.items() if key not in RECORD_FIELDS},
        )


def log_format(path: PathLike) -> str:
    """"jsonl" or "csv" from the file's suffix, or a ValueError naming the suffixes understood."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"log_path {str(path)!r}: cannot tell the format from the suffix {suffix!r}; use one of "
            f"{', '.join(FORMATS)} (JSON lines or CSV)."
        )
    return FORMATS[suffix]


def vectors_path(path: PathLike) -> Path:
    """The side file holding the last eigenvectors of the log at ``path``."""
    path = Path(path)
    return path.with_name(path.name + ".vectors.pt")


class TrackingLogWriteError(OSError):
    """A record could not be written to its log file (a full disk, a read-only file system, ...).

    Nothing of the record was kept: the log was cut back to its last complete record (or, if even
    that failed, is cut back before the next write), the eigenvector side file still holds the
    previous step's vectors, and the tracker's ``records`` lack it, so measuring the step again
    retries it. ``errno`` is that of the failed system call.
    """


def _write_error(cause: OSError, message: str) -> TrackingLogWriteError:
    """A TrackingLogWriteError with the errno of ``cause`` (when it has one) and ``message``."""
    return TrackingLogWriteError(cause.errno, message) if cause.errno is not None else TrackingLogWriteError(message)


class TrackingLogInUseError(OSError):
    """Another writer (a tracker in this process or in another one) holds the log file's lock."""


class TrackingLog:
    """Append-only, crash-safe log of :class:`SharpnessRecord` at ``path`` (format from the suffix).

    The file is opened and locked exclusively when the log is made, and stays locked until
    :meth:`close` (also at the end of a ``with`` block, when the log is garbage-collected, and when
    the process exits), so that a second writer is refused rather than mixing its records in.
    Readers (:func:`read_log`) never need the lock. Under torch.distributed only rank 0 opens,
    locks and writes the file.

    Each record is one line written with ``os.write`` and ``fsync``-ed, together with the
    eigenvectors, which go to a temporary file first and replace the side file only after the line
    is on disk. A write that fails is undone (see :class:`TrackingLogWriteError`).

    Args:
        path: ``.jsonl`` (one JSON object per line) or ``.csv`` (a header, then one row per record;
            list fields become ``eigenvalue_0, eigenvalue_1, ...``).
        if_exists: what to do with an existing file that holds anything: "error" (default: refuse,
            so that two runs never mix silently), "resume" (read it back and append), "overwrite"
            (start afresh). An empty file counts as absent.
        save_vectors: keep the last eigenvectors in ``<path>.vectors.pt`` for a warm resume.

    Raises:
        FileExistsError: the file holds records and ``if_exists="error"``.
        TrackingLogInUseError: another writer holds the file.
    """

    def __init__(self, path: PathLike, if_exists: str = "error", save_vectors: bool = True) -> None:
        self.path = Path(path)
        self.format = log_format(self.path)
        if if_exists not in IF_EXISTS:
            raise ValueError(f"if_exists={if_exists!r}: use one of {', '.join(map(repr, IF_EXISTS))}.")
        self.save_vectors = bool(save_vectors)
        self.vectors_path = vectors_path(self.path)
        self.columns: Optional[list[str]] = None
        self.resumed: list[SharpnessRecord] = []
        # Under torch.distributed every rank measures the same numbers; rank 0 alone writes them.
        self.writes = distributed.is_main_process()
        self._file: Optional[_OpenFile] = None
        self._end = 0  # bytes up to the end of the last complete record
        self._needs_cut = False  # a failed write may have left bytes after _end
        if not self.path.parent.exists():
            raise FileNotFoundError(f"The folder of log_path {str(self.path)!r} does not exist; create it first.")
        if if_exists == "error" and _holds_anything(self.path):
            raise self._exists_error()
        if not self.writes:
            if if_exists == "resume" and self.path.exists():  # read as rank 0 does, which alone warns
                raw = self.path.read_bytes()
                text = raw[: raw.rfind(b"\n") + 1].decode("utf-8", errors="replace")
                self.resumed, self.columns = _parse_complete_lines(text, self.format, str(self.path), [], warn=False)
            return
        self._file = _open_locked(self.path)
        self._finalizer = weakref.finalize(self, _close_file, self._file)
        try:
            self._start(if_exists)
        except BaseException:
            self.close()
            raise

    def _start(self, if_exists: str) -> None:
        fd = self._file.fd
        size = os.fstat(fd).st_size
        if if_exists == "error" and size > 0:  # written between the check above and the lock
            raise self._exists_error()
        if if_exists == "overwrite":
            os.ftruncate(fd, 0)
            os.fsync(fd)
            for stale in (self.vectors_path, _tmp_path(self.vectors_path)):
                _remove_quietly(stale)
        elif size > 0:
            self.resumed = self._read_and_repair()

    def _exists_error(self) -> FileExistsError:
        return FileExistsError(
            f"The log file {str(self.path)!r} exists. Pass if_exists='resume' to continue it (after a crash "
            f"or Ctrl-C), if_exists='overwrite' to start it afresh, or choose another log_path."
        )

    # -- lifetime ------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran (always False on ranks that do not write)."""
        return self.writes and (self._file is None or self._file.fd is None)

    def close(self) -> None:
        """Release the file's lock and close it; a log file created by this log and still empty is
        removed. Safe to call twice."""
        if self._file is not None:
            self._finalizer()

    def __enter__(self) -> "TrackingLog":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- writing -------------------------------------------------------------------------------
    def append(self, record: SharpnessRecord, vectors: Optional[Tensor] = None) -> None:
        """Write one record as a whole line, and ``vectors`` ((k, n), if given and ``save_vectors``)
        to the side file, as one commit: on any failure both are undone and a
        :class:`TrackingLogWriteError` is raised. Does nothing on ranks other than 0."""
        if not self.writes:
            return
        fd = self._writable_fd()
        data, columns = self._encode(record)
        save = vectors is not None and self.save_vectors
        tmp: Optional[Path] = None
        doing = "cutting back what an earlier failed write left"
        try:
            if self._needs_cut:
                self._cut_back()
            if save:
                doing = f"writing the eigenvectors to {str(_tmp_path(self.vectors_path))!r}"
                tmp = self._write_tmp_vectors(record.step, vectors)
            doing = "appending the record"
            _write_all(fd, data)
            doing = "syncing the record to disk"
            os.fsync(fd)
            if tmp is not None:
                doing = f"replacing {str(self.vectors_path)!r}"
                os.replace(tmp, self.vectors_path)
                tmp = None
        except BaseException as exc:
            undone = self._undo(tmp)
            if isinstance(exc, OSError):
                raise self._append_error(exc, record.step, doing, undone) from exc
            raise
        self._end += len(data)
        if columns is not None:
            self.columns = columns

    def write_vectors(self, step: int, vectors: Tensor) -> None:
        """Replace the side file with ``vectors`` ((k, n), from ``step``): written to a temporary file,
        synced, then renamed over the old one, so it is never half written."""
        if not self.save_vectors or not self.writes:
            return
        self._writable_fd()
        try:
            os.replace(self._write_tmp_vectors(step, vectors), self.vectors_path)
        except OSError as exc:
            _remove_quietly(_tmp_path(self.vectors_path))
            raise _write_error(
                exc,
                f"Could not write the eigenvectors of step {step} to {str(self.vectors_path)!r}: "
                f"{exc.strerror or exc}. The side file still holds the previous vectors."
            ) from exc

    def _writable_fd(self) -> int:
        if self._file is None or self._file.fd is None:
            raise RuntimeError(f"The tracking log {str(self.path)!r} is closed; open it again with if_exists='resume'.")
        if self._file.pid != os.getpid():
            raise RuntimeError(
                f"The tracking log {str(self.path)!r} was opened in process {self._file.pid}, not in this one (a "
                f"forked child); only the process that opened it writes it. Open a log of its own here."
            )
        return self._file.fd

    def _encode(self, record: SharpnessRecord) -> tuple[bytes, Optional[list[str]]]:
        """The bytes of the record's line (with the CSV header before the first row), and the CSV
        columns when they are new. Raises ValueError before anything is written."""
        data = record.as_dict()
        if self.format == "jsonl":
            return (json.dumps(data, allow_nan=True) + "\n").encode("utf-8"), None
        if self.columns is not None:
            return _csv_line(_csv_row(data, self.columns, self.path)).encode("utf-8"), None
        columns = _csv_columns(data)
        text = _csv_line(columns) + _csv_line(_csv_row(data, columns, self.path))
        return text.encode("utf-8"), columns

    def _write_tmp_vectors(self, step: int, vectors: Tensor) -> Path:
        buffer = io.BytesIO()
        torch.save({"step": int(step), "eigenvectors": vectors.detach().cpu()}, buffer)
        tmp = _tmp_path(self.vectors_path)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _O_BINARY, 0o666)
        try:
            _write_all(fd, buffer.getbuffer())
            os.fsync(fd)
        finally:
            os.close(fd)
        return tmp

    def _cut_back(self) -> None:
        """Truncate the log to its last complete record."""
        os.ftruncate(self._file.fd, self._end)
        os.fsync(self._file.fd)
        self._needs_cut = False

    def _undo(self, tmp: Optional[Path]) -> Optional[OSError]:
        """Undo a failed append: cut the log back and drop the temporary vectors. Returns the error
        that kept the log from being cut back, if any (the next append tries again)."""
        _remove_quietly(tmp if tmp is not None else _tmp_path(self.vectors_path))
        self._needs_cut = True
        try:
            self._cut_back()
        except OSError as exc:
            return exc
        return None

    def _append_error(self, exc: OSError, step: int, doing: str, cut_error: Optional[OSError]) -> TrackingLogWriteError:
        if cut_error is None:
            kept = ("Nothing of it was kept: the log was cut back to its last complete record, the side file keeps "
                    "the previous eigenvectors, and the tracker's records lack it")
        else:
            kept = (f"It was not kept (the tracker's records lack it, the side file keeps the previous eigenvectors), "
                    f"but the log could not be cut back yet ({cut_error.strerror or cut_error}): the next write "
                    f"cuts it back before appending")
        return _write_error(
            exc,
            f"Could not write the record of step {step} to {str(self.path)!r} ({doing}): {exc.strerror or exc}. "
            f"{kept}. Free disk space or fix the file system; the next tracked step writes again (calling "
            f"step({step}) again retries this one)."
        )

    # -- reading -------------------------------------------------------------------------------
    def read_vectors(self, size: int) -> Optional[tuple[int, Tensor]]:
        """(step, eigenvectors (m, size)) from the side file, or None if absent, unreadable or for another size."""
        if not self.save_vectors or not self.vectors_path.exists():
            return None
        try:
            data = torch.load(self.vectors_path, map_location="cpu", weights_only=True)
            vectors = data["eigenvectors"]
            step = int(data["step"])
        except Exception as exc:  # a damaged side file only costs the warm start
            logger.warning("Could not read %s (%s); the next tracked step starts cold.", self.vectors_path, exc)
            return None
        if not isinstance(vectors, Tensor) or vectors.dim() != 2 or vectors.shape[1] != size:
            logger.warning("%s holds vectors of shape %s, not (k, %d); the next tracked step starts cold.",
                           self.vectors_path, tuple(getattr(vectors, "shape", ())), size)
            return None
        return step, vectors

    def _read_and_repair(self) -> list[SharpnessRecord]:
        """Read the locked file back; a last line cut short (a crash while writing it) is cut from the file."""
        fd = self._file.fd
        raw = _read_all(fd)
        complete = raw.rfind(b"\n") + 1
        tail = []
        if complete < len(raw):
            tail = [(raw[:complete].count(b"\n") + 1, _CUT_SHORT + "; removed from the file")]
            os.ftruncate(fd, complete)
            os.fsync(fd)
        self._end = complete
        text = raw[:complete].decode("utf-8", errors="replace")
        records, self.columns = _parse_complete_lines(text, self.format, str(self.path), tail)
        return records


# -- the open, locked file ---------------------------------------------------------------------
_O_BINARY = getattr(os, "O_BINARY", 0)  # Windows would otherwise translate newlines


class _OpenFile:
    """The descriptor of a locked log file and what closing it needs (kept apart from the log, so that
    the finalizer holds no reference to it)."""

    def __init__(self, fd: int, key: tuple[int, int], path: Path, created: bool) -> None:
        self.fd: Optional[int] = fd
        self.key = key
        self.path = path
        self.created = created
        self.pid = os.getpid()


def _open_locked(path: Path) -> _OpenFile:
    """Open (creating it if need be) and lock the log file, or raise TrackingLogInUseError."""
    for _ in range(5):
        created = True
        try:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL | _O_BINARY, 0o666)
        except FileExistsError:
            created = False
            try:
                fd = os.open(path, os.O_RDWR | os.O_APPEND | _O_BINARY)
            except FileNotFoundError:
                continue  # removed in between; create it
        try:
            key = file_lock.acquire(fd, str(path))
        except file_lock.FileInUse as exc:
            os.close(fd)
            raise _in_use_error(path, exc.in_this_process) from None
        except BaseException:
            os.close(fd)
            raise
        if _same_file(path, key):
            return _OpenFile(fd, key, path, created)
        # Removed or replaced between the open and the lock (a writer closing an empty log removes it).
        file_lock.release(fd, key)
        os.close(fd)
    raise RuntimeError(f"Could not open {str(path)!r}: it keeps being removed or replaced while being opened.")


def _close_file(handle: _OpenFile) -> None:
    fd, handle.fd = handle.fd, None
    if fd is None:
        return
    if handle.pid != os.getpid():
        os.close(fd)  # a forked child's copy: the lock is the parent's, closing it here keeps it
        return
    try:
        if handle.created and os.fstat(fd).st_size == 0 and _same_file(handle.path, handle.key):
            handle.path.unlink()
    except OSError:
        pass
    file_lock.release(fd, handle.key)
    os.close(fd)


def _same_file(path: Path, key: tuple[int, int]) -> bool:
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return False
    return (stat.st_dev, stat.st_ino) == key


def _in_use_error(path: Path, in_this_process: bool) -> TrackingLogInUseError:
    if in_this_process:
        holder = ("another SharpnessTracker (or TrackingLog) in this process is writing it. Close that one "
                  "first (tracker.close(), or use it as a context manager: with SharpnessTracker(...) as tracker:)")
    else:
        holder = ("another process is writing it (another run of this script?). Stop that run or let it "
                  "finish: the file is released when its tracker is closed or its process ends")
    return TrackingLogInUseError(
        f"The log file {str(path)!r} is locked: {holder}; or pass another log_path. Reading the file "
        f"(read_log, plot_log) needs no lock."
    )


def _holds_anything(path: Path) -> bool:
    try:
        return path.stat().st_size > 0
    except FileNotFoundError:
        return False


def _tmp_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _remove_quietly(path: Optional[Path]) -> None:
    if path is None:
        return
    try:
        os.unlink(path)
    except OSError:
        pass  # absent, or a read-only folder: a stale temporary file is never read


def _write_all(fd: int, data: Union[bytes, memoryview]) -> None:
    """os.write until every byte is written (a regular file may take fewer bytes per call)."""
    view = memoryview(data)
    while len(view):
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write() took no bytes")
        view = view[written:]


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


# -- reading -----------------------------------------------------------------------------------
_CUT_SHORT = "cut short (no newline at its end: a crash or a failed write while writing it)"
_MAX_LISTED = 10


def parse_log(text: str, fmt: str, name: str = "log") -> tuple[list[SharpnessRecord], Optional[list[str]]]:
    """Records from the text of a log file of format ``fmt`` ("jsonl" or "csv"); for CSV also its columns.

    A damaged line (not a record, a CSV row of the wrong width, a last line cut short) is skipped,
    and one warning names the file, each such line's number and what was wrong with it. A text
    none of whose lines is a record raises ValueError.
    """
    complete = text.rfind("\n") + 1
    tail = [(text.count("\n") + 1, _CUT_SHORT + "; skipped")] if text[complete:].strip() else []
    return _parse_complete_lines(text[:complete], fmt, name, tail)


def _parse_complete_lines(
    text: str, fmt: str, name: str, tail: list[tuple[int, str]], warn: bool = True,
) -> tuple[list[SharpnessRecord], Optional[list[str]]]:
    """parse_log of a text that ends with a newline; ``tail`` describes what was cut after it."""
    records, columns, problems = _scan(text, fmt)
    if not records and any(what.endswith("skipped") for _, what in problems):
        listed = "; ".join(f"line {number}: {what}" for number, what in problems[:3])
        raise ValueError(f"{name}: none of its lines is a tracking record ({listed}). Is it a tracking log?")
    problems += tail
    if problems and warn:
        _warn(name, problems)
    return records, columns


def _scan(text: str, fmt: str) -> tuple[list[SharpnessRecord], Optional[list[str]], list[tuple[int, str]]]:
    """Records, CSV columns and (line number, what was wrong) of every damaged line, of complete lines."""
    records: list[SharpnessRecord] = []
    problems: list[tuple[int, str]] = []
    columns: Optional[list[str]] = None
    for number, line in enumerate(text.split("\n")[:-1], start=1):
        line = line.rstrip("\r")
        if not line.strip():
            continue
        if fmt == "jsonl":
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                problems.append((number, f"not JSON ({exc}); skipped"))
                continue
            if not isinstance(data, dict):
                problems.append((number, f"a JSON {type(data).__name__}, not an object; skipped"))
                continue
        else:
            try:
                cells = next(csv.reader([line]))
            except csv.Error as exc:
                problems.append((number, f"not CSV ({exc}); skipped"))
                continue
            if _is_csv_header(cells):
                if columns is not None:
                    problems.append((number, "a second CSV header (two writers on one file?); the rows below it "
                                             "are read with its columns"))
                columns = cells
                continue
            if columns is None:
                problems.append((number, "a CSV row before any header; skipped"))
                continue
            if len(cells) != len(columns):
                problems.append((number, f"{len(cells)} cells for {len(columns)} columns; skipped"))
                continue
            data = dict(zip(columns, cells))
        try:
            records.append(SharpnessRecord.from_dict(data if fmt == "jsonl" else _from_csv_row(data)))
        except (ValueError, TypeError, KeyError, ArithmeticError) as exc:  # e.g. int(float("inf"))
            problems.append((number, f"not a tracking record ({exc}); skipped"))
    return records, columns, problems


def _is_csv_header(cells: list[str]) -> bool:
    return cells[: len(_SCALARS)] == list(_SCALARS) and "eigenvalue_0" in cells


def _warn(name: str, problems: list[tuple[int, str]]) -> None:
    listed = "; ".join(f"line {number}: {what}" for number, what in problems[:_MAX_LISTED])
    more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    warnings.warn(f"Tracking log {name!r}: {listed}{more}.", UserWarning, stacklevel=user_stacklevel())


def read_log(path: PathLike) -> list[SharpnessRecord]:
    """All records of a tracking log file (.jsonl or .csv), in file order. Damaged lines (such as a
    last line cut short by a crash) are skipped with a warning and left in the file. Takes no lock,
    so it also reads a log that a tracker is writing."""
    path = Path(path)
    fmt = log_format(path)
    if not path.exists():
        raise FileNotFoundError(f"No tracking log at {str(path)!r}.")
    return parse_log(path.read_bytes().decode("utf-8", errors="replace"), fmt, str(path))[0]


# -- CSV helpers -------------------------------------------------------------------------------
def _csv_columns(data: dict[str, Any]) -> list[str]:
    columns = list(_SCALARS)
    for name, prefix in _LISTS:
        columns += [f"{prefix}_{i}" for i in range(len(data[name]))]
    columns += [key for key in data if key not in RECORD_FIELDS]
    broken = [key for key in columns if "\n" in key or "\r" in key]
    if broken:  # every line of a CSV log is read on its own, so a name may not span two
        raise ValueError(
            f"The extras {broken} have line breaks in their names, which a CSV log cannot hold; rename them."
        )
    return columns


def _csv_row(data: dict[str, Any], columns: list[str], path: Path) -> list[str]:
    flat: dict[str, Any] = {name: data[name] for name in _SCALARS}
    for name, prefix in _LISTS:
        flat.update({f"{prefix}_{i}": value for i, value in enumerate(data[name])})
    for key, value in data.items():
        if key in RECORD_FIELDS:
            continue
        if isinstance(value, list):
            raise ValueError(
                f"The extra {key!r} is a list, which a CSV log cannot hold in one cell; use a .jsonl log_path."
            )
        flat[key] = value
    new = [key for key in flat if key not in columns]
    if new:
        raise ValueError(
            f"{str(path)!r}: this record has fields {new} that the CSV header (written with the first record) "
            f"lacks; a CSV log needs the same eigenvalue count and extras in every record. Use a .jsonl log_path."
        )
    return ["" if flat.get(col) is None else _csv_cell(flat[col]) for col in columns]


def _csv_cell(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _csv_line(cells: list[str]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerow(cells)
    return buffer.getvalue()


def _from_csv_row(row: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    lists: dict[str, dict[int, str]] = {name: {} for name, _ in _LISTS}
    prefixes = {prefix + "_": name for name, prefix in _LISTS}
    for key, cell in row.items():
        matched = False
        for prefix, name in prefixes.items():
            if key.startswith(prefix) and key[len(prefix):].isdigit():
                lists[name][int(key[len(prefix):])] = cell
                matched = True
                break
        if not matched:
            out[key] = cell
    out["eigenvalues"] = [float(lists["eigenvalues"][i]) for i in sorted(lists["eigenvalues"])]
    out["residuals"] = [float(lists["residuals"][i]) if lists["residuals"][i] else math.nan for i in sorted(lists["residuals"])]
    out["converged"] = [lists["converged"][i] == "1" for i in sorted(lists["converged"])]
    for name in ("warm", "preconditioned"):
        out[name] = out.get(name) == "1"
    for key in list(out):
        if key in RECORD_FIELDS:
            continue
        out[key] = _parse_cell(out[key])
    return out


def _parse_cell(cell: str) -> Any:
    if cell == "":
        return None
    try:
        return int(cell)
    except ValueError:
        pass
    try:
        return float(cell)
    except ValueError:
        return cell
