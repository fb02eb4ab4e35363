"""The tracking record and its log file: JSON lines or CSV, appended and synced to disk per record.

Every record is written with one ``write`` of a whole line, then flushed and ``fsync``-ed, so a
crash or Ctrl-C loses at most the record being measured. A line cut short by a crash is dropped
(and cut from the file) when the log is read back for a resume. The last eigenvectors go to a
side file ``<log>.vectors.pt``, replaced atomically, so that a resumed run keeps its warm start.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

from .. import distributed
from ..utils import logger

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


class TrackingLog:
    """Append-only, crash-safe log of :class:`SharpnessRecord` at ``path`` (format from the suffix).

    Args:
        path: ``.jsonl`` (one JSON object per line) or ``.csv`` (a header, then one row per record;
            list fields become ``eigenvalue_0, eigenvalue_1, ...``).
        if_exists: what to do with an existing file: "error" (default: refuse, so that two runs
            never mix silently), "resume" (read it back and append), "overwrite" (start afresh).
        save_vectors: keep the last eigenvectors in ``<path>.vectors.pt`` for a warm resume.
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
        if self.path.exists():
            if if_exists == "error":
                raise FileExistsError(
                    f"The log file {str(self.path)!r} exists. Pass if_exists='resume' to continue it (after a crash "
                    f"or Ctrl-C), if_exists='overwrite' to start it afresh, or choose another log_path."
                )
            if if_exists == "overwrite":
                if self.writes:
                    self.path.unlink()
                    if self.vectors_path.exists():
                        self.vectors_path.unlink()
            else:
                self.resumed = self._read_and_repair()
        if not self.path.parent.exists():
            raise FileNotFoundError(f"The folder of log_path {str(self.path)!r} does not exist; create it first.")

    # -- writing -------------------------------------------------------------------------------
    def append(self, record: SharpnessRecord) -> None:
        """Write one record as a whole line, flush and fsync it (on rank 0 only under torch.distributed)."""
        if not self.writes:
            return
        data = record.as_dict()
        if self.format == "jsonl":
            text = json.dumps(data, allow_nan=True) + "\n"
        else:
            header = ""
            if self.columns is None:
                self.columns = _csv_columns(data)
                header = _csv_line(self.columns)
            text = header + _csv_line(_csv_row(data, self.columns, self.path))
        with open(self.path, "a", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())

    def write_vectors(self, step: int, vectors: Tensor) -> None:
        """Replace the side file with ``vectors`` ((k, n), from ``step``): written to a temporary file,
        synced, then renamed over the old one, so it is never half written."""
        if not self.save_vectors or not self.writes:
            return
        tmp = self.vectors_path.with_name(self.vectors_path.name + ".tmp")
        with open(tmp, "wb") as handle:
            torch.save({"step": int(step), "eigenvectors": vectors.detach().cpu()}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.vectors_path)

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

    # -- reading -------------------------------------------------------------------------------
    def _read_and_repair(self) -> list[SharpnessRecord]:
        raw = self.path.read_bytes()
        complete = raw.rfind(b"\n") + 1
        if complete < len(raw) and not self.writes:
            raw = raw[:complete]
        elif complete < len(raw):
            logger.warning("%s ends in a partial line (a crash while writing); dropping it.", self.path)
            with open(self.path, "r+b") as handle:
                handle.truncate(complete)
                handle.flush()
                os.fsync(handle.fileno())
            raw = raw[:complete]
        records, columns = parse_log(raw.decode("utf-8"), self.format, str(self.path))
        self.columns = columns
        return records


def parse_log(text: str, fmt: str, name: str = "log") -> tuple[list[SharpnessRecord], Optional[list[str]]]:
    """Records from the text of a log file of format ``fmt`` ("jsonl" or "csv"); for CSV also its columns."""
    if fmt == "jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(SharpnessRecord.from_dict(json.loads(line)))
            except (json.JSONDecodeError, ValueError, TypeError) as exc:
                raise ValueError(f"{name}, line {number}: not a tracking record ({exc}).") from None
        return records, None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return [], None
    columns = rows[0]
    if "step" not in columns or "eigenvalue_0" not in columns:
        raise ValueError(f"{name}: the CSV header {columns} is not a tracking log's (no step / eigenvalue_0).")
    records = []
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(columns):
            raise ValueError(f"{name}, line {number}: {len(row)} cells for {len(columns)} columns.")
        records.append(SharpnessRecord.from_dict(_from_csv_row(dict(zip(columns, row)))))
    return records, columns


def read_log(path: PathLike) -> list[SharpnessRecord]:
    """All records of a tracking log file (.jsonl or .csv), in file order. A partial last line (from a
    crash) is ignored here and left in the file."""
    path = Path(path)
    fmt = log_format(path)
    if not path.exists():
        raise FileNotFoundError(f"No tracking log at {str(path)!r}.")
    text = path.read_text(encoding="utf-8")
    cut = text.rfind("\n") + 1
    return parse_log(text[:cut], fmt, str(path))[0]


# -- CSV helpers -------------------------------------------------------------------------------
def _csv_columns(data: dict[str, Any]) -> list[str]:
    columns = list(_SCALARS)
    for name, prefix in _LISTS:
        columns += [f"{prefix}_{i}" for i in range(len(data[name]))]
    columns += [key for key in data if key not in RECORD_FIELDS]
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
