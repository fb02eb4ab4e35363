"""Benchmark: top-k Hessian eigenpairs by this package's solvers and by other libraries, side by side.

    python benchmarks/run.py --quick                       # small CPU run, a few minutes on 2 cores
    python benchmarks/run.py                               # default sizes, CPU
    python benchmarks/run.py --device cuda --gpu-sized     # GPU sizes, adds a ResNet-18 (11M params)
    python benchmarks/run.py --workloads mlp,transformer --methods auto,thick_restart,lanczos --k 1,10

For every workload, every k of ``--k`` and every method the table gives the wall time, the number
of Hessian-vector products, the peak memory (CUDA: peak allocated device memory above the start;
CPU: peak resident memory above the start, sampled every 2 ms), the accuracy, and what
``mode="auto"`` chose. Accuracy is the largest relative eigenvalue error and the largest relative
residual ``||H v - lambda v|| / |lambda|``, against one of two references (``--reference``):

* ``float64`` (default on a CPU): the same model and data in float64, ARPACK to 1e-10; residuals
  measured with the float64 Hessian.
* ``best`` (default with ``--device cuda --gpu-sized``, where a float64 reference would take longer
  than the solves): the answer of the method with the smallest residual, every residual measured with
  the same float32 operator (one block product per answer, outside the timing).

A second table gives each of our solvers' speed-up against every baseline, and the run ends with
one verdict line per target: ResNet-18 ``auto`` at most 0.5x the time of curvlinops+eigsh at every
k, the GPT ``auto`` top-10 at most 0.25x curvlinops, and ``auto`` within 10% of the best of its
candidates (thick_restart, block_lanczos at the width auto chose, ARPACK) on every workload.

Methods: ours, ``auto`` (the default mode) and its candidates ``thick_restart`` and
``block_lanczos`` (at the block width ``auto`` chose, or else the width it predicted best); the
baselines ``lanczos`` (our ARPACK mode), ``power_iter``, curvlinops' HessianLinearOperator with
scipy eigsh, and PyHessian's eigenvalues(). The last two are optional benchmark-only dependencies
(``pip install curvlinops-for-pytorch pyhessian``); a missing or failing one is skipped with a note.
All methods target the same relative tolerance (--tol).

The methods run in three rounds over every workload and k: ``auto`` and curvlinops (the targets),
then the candidates, then the slow baselines (these two rounds take the cases in order of auto's
time, the cheapest first). With ``--budget`` the run stops starting methods (and
stops the one running) when the budget is spent; with ``--cap-factor`` a method other than ``auto``
is stopped once it has taken that many times ``auto``'s time on the same problem (then its row
gives a lower bound, ``> t``, which is all a verdict needs); ``--curvlinops-cap-factor`` and
``--slow-cap-factor`` do the same for curvlinops and for ARPACK, power iteration and PyHessian. ``--markdown`` is rewritten after every method, so that
a run stopped from outside still leaves its tables.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import math
import os
import platform
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from baselines import Skipped, curvlinops_eigsh, curvlinops_product_error, pyhessian_eigenvalues  # noqa: E402
from workloads import WORKLOADS, Workload, make_workload  # noqa: E402

from hessian_eigenthings import HVPOperator, compute_hessian_eigenthings, lanczos  # noqa: E402

NATIVE = ("auto", "thick_restart", "block_lanczos")
BASELINES = ("lanczos", "power_iter", "curvlinops", "pyhessian")
METHODS = NATIVE + BASELINES
#: The rounds: every workload and k gets the methods of a round before any gets the next round's.
ROUNDS = (("auto", "curvlinops"), ("thick_restart", "block_lanczos"), ("lanczos", "power_iter", "pyhessian"))
#: ``auto``'s candidates, against which "auto within 10% of the best" is judged.
CANDIDATES = ("thick_restart", "block_lanczos", "lanczos")
SLOW = ("lanczos", "power_iter", "pyhessian")
#: Targets: (workload, k or None for every k, the most auto may take as a fraction of curvlinops' time).
CURVLINOPS_TARGETS = (("resnet", None, 0.5), ("transformer", 10, 0.25))
CANDIDATE_MARGIN = 1.10
#: A capped method runs at least this long, so that a very fast auto does not cut others to nothing.
CAP_FLOOR_SECONDS = 5.0
#: With less of the run's budget left than this, a method is not started.
MIN_BUDGET_SECONDS = 1.0


@dataclass
class Row:
    method: str
    seconds: float = float("nan")
    products: Optional[int] = None
    peak_mb: float = float("nan")
    eig_error: float = float("nan")
    residual: float = float("nan")
    note: str = ""
    ok: bool = True
    capped: bool = False  # stopped at its time cap: ``seconds`` is a lower bound
    choice: str = ""
    values: Optional[np.ndarray] = None
    residuals: Optional[np.ndarray] = None


@dataclass
class Case:
    """One workload at one k, and the rows of the methods run on it so far."""

    work: Workload
    k: int
    rows: dict = field(default_factory=dict)
    auto_info: dict = field(default_factory=dict)
    reference: Optional[np.ndarray] = None  # float64 reference eigenvalues (largest |lambda| first)
    reference_residual: float = float("nan")
    reference_method: str = ""  # with --reference best: whose answer the errors are measured against
    op64: Optional[HVPOperator] = None  # the float64 operator of the float64 reference


class TimeCap(Exception):
    """A method ran past its time cap (see ``--cap-factor`` and ``--budget``)."""


@contextlib.contextmanager
def time_cap(seconds: Optional[float]) -> Iterator[None]:
    """Raise :class:`TimeCap` in the main thread after ``seconds`` (None: no cap). Our solvers and
    the model-state guards unwind on any exception, and the model is also restored by the caller."""
    if seconds is None or not hasattr(signal, "setitimer"):
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise TimeCap(f"stopped after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 1e-3))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator statistics, or resident memory on a CPU
    (sampled by a thread, as torch's CPU allocations are invisible to tracemalloc).

    On CUDA the operator resets the allocator's peak to time each of its plans; the peak reached
    before each such reset is read first (by wrapping ``torch.cuda.reset_peak_memory_stats``), so
    that the solve's own peak is not lost."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = float("nan")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._start = torch.cuda.memory_allocated()
            self._peak = self._start
            self._reset = torch.cuda.reset_peak_memory_stats

            def reset(device: Any = None) -> None:
                self._peak = max(self._peak, torch.cuda.max_memory_allocated(device))
                self._reset(device)

            torch.cuda.reset_peak_memory_stats = reset
        else:
            self._start = _rss_bytes()
            self._peak = self._start
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats = self._reset
            torch.cuda.synchronize()
            self.peak_mb = (max(self._peak, torch.cuda.max_memory_allocated()) - self._start) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = (max(self._peak, _rss_bytes()) - self._start) / 2**20


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # not Linux: no sampling, the column reads 0
        return 0


# -- the methods ---------------------------------------------------------------------------------
def run_method(method: str, case: Case, args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, int, str]:
    """One solve; returns (eigenvalues (k,), eigenvectors (k, n), products, note)."""
    work, k = case.work, case.k
    device = torch.device(args.device)
    common = dict(use_gpu=device.type == "cuda", device=device, verbose=False,
                  max_possible_gpu_samples=max(len(x) for x, _ in work.batches))
    if method in NATIVE or method == "lanczos":
        options: dict = {}
        note = ""
        if method == "block_lanczos":
            width, why = block_width(case)
            if width is not None:
                options["block_size"] = width
            note = f"b={width or 'default'} ({why})"
        result = compute_hessian_eigenthings(work.model, work.batches, work.criterion, k, mode=method,
                                             tol=args.tol, seed=args.seed, **options, **common)
        if method == "auto":
            case.auto_info = dict(result.info.get("auto", {}))
        if not result.converged.all():
            note = ", ".join(filter(None, [note, "not converged"]))
        if method == "lanczos":
            note = ", ".join(filter(None, [f"incl. {k} residual products", note]))
        return result.eigenvalues, result.eigenvectors, result.num_products, note
    if method == "power_iter":
        result = compute_hessian_eigenthings(work.model, work.batches, work.criterion, k, mode="power_iter",
                                             power_iter_steps=args.power_steps, power_iter_err_threshold=args.tol,
                                             seed=args.seed, **common)
        note = "" if result.converged.all() else f"not converged in {args.power_steps} steps/pair"
        return result.eigenvalues, result.eigenvectors, result.num_products, note
    if method == "curvlinops":
        vals, vecs, products = curvlinops_eigsh(work, k, args.tol, args.seed)
        return vals, vecs, products, ""
    if method == "pyhessian":
        vals, vecs, products = pyhessian_eigenvalues(work, k, args.tol, args.power_steps, args.seed)
        return vals, vecs, products, f"stops on eigenvalue change < tol, maxIter {args.power_steps}"
    raise ValueError(method)


def block_width(case: Case) -> tuple[Optional[int], str]:
    """The width block Lanczos runs at: the one ``auto`` chose, else the block option it predicted
    fastest, else the solver's default (auto did not run or predicted none)."""
    info = case.auto_info
    if info.get("solver") == "block_lanczos":
        return int(info["block_size"]), "auto's choice"
    blocks = {label: seconds for label, seconds in info.get("predicted_seconds", {}).items()
              if label.startswith("block_lanczos b=")}
    if blocks:
        best = min(blocks, key=blocks.__getitem__)
        return int(best.split("=")[1]), "auto's best block width"
    return None, "auto measured no block width"


def describe_choice(info: dict) -> str:
    """``auto``'s choice in a few words, from ``result.info["auto"]``."""
    if not info:
        return ""
    solver = info.get("solver", "?")
    width = info.get("block_size", 1)
    text = solver + (f" b={width}" if solver == "block_lanczos" else "")
    if info.get("second_pass_ratio") is not None:
        text += f"; kept product {info['second_pass_ratio']:.2f}x its saved pass"
    if info.get("decided_after_products"):
        text += f"; decided after {info['decided_after_products']} products"
    if info.get("probe_products"):
        text += f" + a probe of {info['probe_products']}"
    return text


# -- accuracy ------------------------------------------------------------------------------------
def float64_reference(work64: Workload, k: int, device: torch.device) -> tuple[np.ndarray, HVPOperator, float]:
    """Float64 eigenvalues by ARPACK to 1e-10 (k + 2 of them, for robust matching) and the operator."""
    op = HVPOperator(work64.model, work64.batches, work64.criterion, device=device,
                     max_possible_gpu_samples=max(len(x) for x, _ in work64.batches))
    result = lanczos(op, k + 2, tol=1e-10, max_steps=100, verbose=False)
    order = np.argsort(-np.abs(result.eigenvalues), kind="stable")
    return result.eigenvalues[order][:k], op, float(np.max(result.relative_residuals[:k]))


def residuals(vals: np.ndarray, vecs: np.ndarray, op: HVPOperator) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues, relative residuals ``||H v - lambda v|| / |lambda|`` by ``op``), ordered by
    decreasing |lambda|; one block product, in the operator's dtype."""
    order = np.argsort(-np.abs(vals), kind="stable")
    vals, vecs = np.asarray(vals, dtype=np.float64)[order], np.asarray(vecs, dtype=np.float64)[order]
    block = torch.as_tensor(vecs.T.copy(), dtype=op.dtype, device=op.device)
    block = block / torch.linalg.vector_norm(block, dim=0, keepdim=True)
    lam = torch.as_tensor(vals, dtype=op.dtype, device=op.device)
    res = torch.linalg.vector_norm(op.apply_block(block) - block * lam, dim=0) / lam.abs()
    return vals, res.double().cpu().numpy()


def settle_accuracy(case: Case) -> None:
    """Eigenvalue errors against the float64 reference, or else against the answer with the smallest
    largest residual (see the module docstring)."""
    rows = [row for row in case.rows.values() if row.ok and row.values is not None]
    reference = case.reference
    if reference is None:
        usable = [row for row in rows if len(row.values) >= case.k and np.isfinite(row.residual)]
        if not usable:
            return
        best = min(usable, key=lambda row: row.residual)
        reference = best.values[: case.k]
        case.reference_residual = best.residual
        case.reference_method = best.method
    for row in rows:
        m = min(len(row.values), len(reference))
        row.eig_error = float(np.max(np.abs(row.values[:m] - reference[:m]) / np.abs(reference[:m])))


# -- running -------------------------------------------------------------------------------------
def model_state(model: torch.nn.Module) -> tuple[dict, bool, dict]:
    return ({name: t.detach().clone() for name, t in model.state_dict().items()}, model.training,
            {name: p.requires_grad for name, p in model.named_parameters()})


def restore_model(model: torch.nn.Module, state: tuple[dict, bool, dict]) -> None:
    """Put the model back after a method was stopped from outside (its own guards should have)."""
    tensors, training, flags = state
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t.copy_(tensors[name])
    model.train(training)
    for name, p in model.named_parameters():
        p.requires_grad_(flags[name])
        p.grad = None


def run_one(case: Case, method: str, args: argparse.Namespace, op_check: Optional[HVPOperator]) -> Row:
    """Solve, time and check one method on one case."""
    device = torch.device(args.device)
    row = Row(method)
    cap, why = cap_seconds(case, method, args)
    if cap is not None and cap < MIN_BUDGET_SECONDS and why == "the run's budget":
        row.ok, row.note = False, "skipped: the run's time budget (--budget) was spent"
        return row
    state = model_state(case.work.model) if cap is not None else None
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with PeakMemory(device) as memory:
                with time_cap(cap):
                    vals, vecs, products, note = run_method(method, case, args)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                row.seconds = time.perf_counter() - start
        row.peak_mb, row.products, row.note = memory.peak_mb, products, note
        if method == "auto":
            row.choice = describe_choice(case.auto_info)
        op = case.op64 if case.reference is not None else op_check
        row.values, row.residuals = residuals(vals, vecs, op)
        row.residual = float(np.max(row.residuals))
        if method == "curvlinops" and case.reference is not None:
            off = curvlinops_product_error(case.work, case.op64, args.seed)
            if off > 1e-4:
                row.note = f"its H v is {off:.1e} off the float64 product"
    except TimeCap:
        row.seconds = time.perf_counter() - start
        row.ok, row.capped = False, True
        row.note = f"stopped at its time cap of {cap:.0f} s ({why})"
        restore_model(case.work.model, state)
    except Skipped as exc:
        row.ok, row.note = False, f"skipped: {exc}"
    except Exception as exc:  # a baseline that fails is reported, not fatal
        row.ok, row.note = False, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:150] if str(exc) else ''}"
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def cap_seconds(case: Case, method: str, args: argparse.Namespace) -> tuple[Optional[float], str]:
    """Seconds ``method`` may run on ``case`` (None: no limit), and why: the rest of the run's budget,
    or a multiple of auto's time on the same problem."""
    caps = []
    if args.deadline is not None:
        caps.append((args.deadline - time.perf_counter(), "the run's budget"))
    factor = cap_factor(method, args)
    auto = case.rows.get("auto")
    if method != "auto" and factor and auto is not None and auto.ok:
        caps.append((max(CAP_FLOOR_SECONDS, factor * auto.seconds), f"{factor:g}x auto's time"))
    return min(caps) if caps else (None, "")


def cap_factor(method: str, args: argparse.Namespace) -> float:
    """The multiple of auto's time after which ``method`` is stopped (0: never)."""
    if method in SLOW:
        return args.slow_cap_factor
    return args.curvlinops_cap_factor if method == "curvlinops" else args.cap_factor


def auto_seconds(case: Case) -> float:
    auto = case.rows.get("auto")
    return auto.seconds if auto is not None and auto.ok else math.inf


def warm_up(work: Workload, device: torch.device) -> None:
    """One single and one vmapped block product first, so that no method pays for one-time set-up
    (allocator, autograd, kernels, functorch)."""
    largest = max(len(x) for x, _ in work.batches)
    warm = HVPOperator(work.model, work.batches, work.criterion, device=device, max_possible_gpu_samples=largest)
    warm.apply(torch.zeros(warm.size, dtype=warm.dtype, device=device))
    block = HVPOperator(work.model, work.batches, work.criterion, device=device, backend="forward_over_reverse",
                        batched=True, max_possible_gpu_samples=largest)
    block.apply_block(torch.zeros(block.size, 2, dtype=block.dtype, device=device))


def checking_operator(work: Workload, device: torch.device) -> HVPOperator:
    """The float32 operator that measures every answer's residual with ``--reference best``: one
    vmapped forward-over-reverse block per answer (the cheapest plan per vector for a fresh block
    on the GPU workloads measured), so that no time goes into trying plans."""
    return HVPOperator(work.model, work.batches, work.criterion, device=device, backend="forward_over_reverse",
                       batched=True, max_possible_gpu_samples=max(len(x) for x, _ in work.batches))


# -- the report ----------------------------------------------------------------------------------
def _fmt_row(row: Row) -> str:
    if not row.ok:
        return (f"> {row.seconds:.2f} s " if row.capped else "") + row.note
    return (f"{row.seconds:8.2f} s {row.products:6d} HVPs {row.peak_mb:8.1f} MB "
            f"res {row.residual:.1e} {row.choice} {row.note}")


def markdown_tables(case: Case, args: argparse.Namespace) -> str:
    work = case.work
    if case.reference is not None:
        against = f"float64 reference (ARPACK to 1e-10, residual {case.reference_residual:.1e}); " \
                  f"residuals by the float64 operator"
    elif case.reference_method:
        against = f"reference: the answer of {case.reference_method} (smallest residual, " \
                  f"{case.reference_residual:.1e}); residuals by the float32 operator"
    else:
        against = "no reference"
    lines = [f"### {work.name}, top {case.k}: {work.description}", "",
             f"{work.num_params:,} parameters, {work.num_samples} samples, top {case.k} (largest |lambda|), "
             f"tol {args.tol:g}; {against}.", "",
             "| method | time (s) | HVPs | peak mem (MB) | max rel. eig. error | max rel. residual | auto's choice | note |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for method in args.methods:
        row = case.rows.get(method)
        if row is None:
            continue
        if row.ok:
            lines.append(f"| {row.method} | {row.seconds:.2f} | {row.products} | {row.peak_mb:.1f} | "
                         f"{row.eig_error:.1e} | {row.residual:.1e} | {row.choice} | {row.note} |")
        elif row.capped:
            lines.append(f"| {row.method} | > {row.seconds:.2f} | - | - | - | - | | {row.note} |")
        else:
            lines.append(f"| {row.method} | - | - | - | - | - | | {row.note} |")
    natives = [case.rows[m] for m in args.methods if m in NATIVE and m in case.rows and case.rows[m].ok]
    baselines = [case.rows[m] for m in args.methods if m in BASELINES and m in case.rows and case.rows[m].ok]
    if natives and baselines:
        lines += ["", "Speed-up of each of our solvers (baseline time / ours, baseline HVPs / ours):", "",
                  "| ours \\ baseline | " + " | ".join(b.method for b in baselines) + " |",
                  "|---|" + "---:|" * len(baselines)]
        for nat in natives:
            cells = [f"{b.seconds / nat.seconds:.2f}x time, {b.products / nat.products:.2f}x HVPs" for b in baselines]
            lines.append(f"| {nat.method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdicts(cases: list[Case], args: argparse.Namespace) -> list[str]:
    """One line per target (see the module docstring): met, missed, or not measured and why."""
    sized = "" if args.gpu_sized and not args.quick else " [not the target's sizes]"
    lines = []
    for name, k_target, limit in CURVLINOPS_TARGETS if "curvlinops" in args.methods else ():
        for case in cases:
            if case.work.name != name or (k_target is not None and case.k != k_target):
                continue
            label = f"{name} top-{case.k}: auto <= {limit:g}x curvlinops+eigsh{sized}"
            lines.append(_ratio_verdict(label, case.rows.get("auto"), [case.rows.get("curvlinops")], limit))
    for case in cases:
        label = f"{case.work.name} top-{case.k}: auto <= {CANDIDATE_MARGIN:.2f}x its best candidate{sized}"
        candidates = [case.rows.get(m) for m in CANDIDATES if m in args.methods]
        lines.append(_ratio_verdict(label, case.rows.get("auto"), candidates, CANDIDATE_MARGIN))
    return lines


def _ratio_verdict(label: str, auto: Optional[Row], others: list[Optional[Row]], limit: float) -> str:
    """Whether auto's time is at most ``limit`` times every other row's. A row stopped at its cap
    took at least its time: it decides the verdict only where that bound is enough."""
    if auto is None or not auto.ok:
        return f"VERDICT {label}: NOT MEASURED (auto: {auto.note if auto else 'not run'})"
    done = [row for row in others if row is not None and row.ok]
    capped = [row for row in others if row is not None and row.capped]
    if not done and not capped:
        notes = "; ".join(f"{row.method}: {row.note}" for row in others if row is not None) or "not run"
        return f"VERDICT {label}: NOT MEASURED ({notes})"
    parts = []
    if done:
        best = min(done, key=lambda row: row.seconds)
        parts.append(f"auto {auto.seconds:.2f} s / {best.method} {best.seconds:.2f} s = {auto.seconds / best.seconds:.2f}x")
    open_bounds = [row for row in capped if auto.seconds > limit * row.seconds]
    for row in capped:
        parts.append(f"{row.method} stopped at {row.seconds:.2f} s (ratio < {auto.seconds / row.seconds:.2f}x)")
    if done and auto.seconds > limit * best.seconds:
        state = "MISSED"
    elif open_bounds:
        state = "NOT DECIDED (" + ", ".join(row.method for row in open_bounds) + " stopped too early to tell)"
    else:
        state = "MET"
    missing = [row.method for row in others if row is not None and not (row.ok or row.capped)]
    extra = f"; not run or failed: {', '.join(missing)}" if missing else ""
    return f"VERDICT {label}: {'; '.join(parts)}: {state}{extra}"


def machine_header(args: argparse.Namespace) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU: {cpu}"
    versions = [f"torch {torch.__version__}"]
    for name, dist in (("scipy", "scipy"), ("curvlinops", "curvlinops-for-pytorch"), ("pyhessian", "pyhessian")):
        try:
            __import__(name)
            try:
                versions.append(f"{name} {importlib.metadata.version(dist)}")
            except importlib.metadata.PackageNotFoundError:
                versions.append(f"{name} (installed)")
        except Exception:
            versions.append(f"{name} (not importable)")
    return (f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}\n"
            f"- machine: {device}; {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}\n"
            f"- versions: {', '.join(versions)}, Python {platform.python_version()}\n"
            f"- command: `python {' '.join(sys.argv)}`\n")


def report(header: str, cases: list[Case], args: argparse.Namespace) -> str:
    parts = ["## Results", "", header]
    for case in cases:
        if case.rows:
            settle_accuracy(case)
            parts.append(markdown_tables(case, args))
    lines = verdicts(cases, args)
    if lines:
        parts += ["### Verdicts", "", "```", *lines, "```", ""]
    return "\n".join(parts)


def write(path: Optional[str], text: str) -> None:
    if path:
        with open(path + ".part", "w") as f:
            f.write(text)
        os.replace(path + ".part", path)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--k", default=None, help="eigenpairs per solve, or a comma list (default 10; 5 with --quick)")
    parser.add_argument("--workloads", default=None,
                        help=f"comma list from {','.join(WORKLOADS)} (default mlp,cnn,transformer; "
                             f"with --gpu-sized also resnet)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {','.join(METHODS)}")
    parser.add_argument("--quick", action="store_true", help="small models and k=5: a few minutes on a 2-core CPU")
    parser.add_argument("--gpu-sized", action="store_true",
                        help="GPU sizes: MLP 1024 wide (1.1M params), the 4x256 GPT, and ResNet-18 (11M)")
    parser.add_argument("--resnet-samples", type=int, default=1024, help="ResNet-18 images (default 1024)")
    parser.add_argument("--reference", choices=("float64", "best"), default=None,
                        help="what eigenvalue errors are measured against (default: best with --device cuda "
                             "--gpu-sized, else float64)")
    parser.add_argument("--tol", type=float, default=1e-4, help="relative residual target of every method")
    parser.add_argument("--power-steps", type=int, default=None,
                        help="power iteration / PyHessian steps per eigenpair (default 100, PyHessian's maxIter)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole run: later methods are skipped, the running one stopped")
    parser.add_argument("--cap-factor", type=float, default=0.0,
                        help="stop auto's candidates after this many times auto's time (0: never)")
    parser.add_argument("--curvlinops-cap-factor", type=float, default=None,
                        help="the same for curvlinops (default: --cap-factor; above 4 to decide a 0.25x target)")
    parser.add_argument("--slow-cap-factor", type=float, default=None,
                        help="the same for ARPACK, power iteration and PyHessian (default: --cap-factor)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", default=None, help="also write the report (markdown) to this file")
    args = parser.parse_args(argv)
    try:
        args.ks = [int(k) for k in str(args.k or (5 if args.quick else 10)).split(",") if k.strip()]
    except ValueError:
        parser.error(f"--k takes whole numbers separated by commas, got {args.k!r}")
    if not args.ks or min(args.ks) < 1:
        parser.error("--k must name at least one k >= 1")
    args.power_steps = args.power_steps or 100
    if args.slow_cap_factor is None:
        args.slow_cap_factor = args.cap_factor
    if args.curvlinops_cap_factor is None:
        args.curvlinops_cap_factor = args.cap_factor
    default_workloads = "mlp,cnn,transformer" + (",resnet" if args.gpu_sized else "")
    args.workloads = [w.strip() for w in (args.workloads or default_workloads).split(",") if w.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name, allowed, given in (("workloads", WORKLOADS, args.workloads), ("methods", METHODS, args.methods)):
        unknown = [x for x in given if x not in allowed]
        if unknown:
            parser.error(f"unknown {name}: {', '.join(unknown)}; choose from {', '.join(allowed)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False here")
    if "resnet" in args.workloads and not (args.gpu_sized or args.quick):
        parser.error("the resnet workload is GPU-sized: add --gpu-sized (and --device cuda), or --quick for a tiny one")
    if args.reference is None:
        args.reference = "best" if args.device.startswith("cuda") and args.gpu_sized else "float64"
    return args


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.deadline = None if args.budget is None else time.perf_counter() + args.budget
    device = torch.device(args.device)
    header = machine_header(args)
    print(header, flush=True)
    cases: list[Case] = []
    checkers: dict[str, HVPOperator] = {}
    for name in args.workloads:
        print(f"{name}: building and training...", file=sys.stderr, flush=True)
        work = make_workload(name, device, args.quick, args.gpu_sized, args.seed, resnet_samples=args.resnet_samples)
        warm_up(work, device)
        reference = None
        if args.reference == "float64":
            reference = float64_reference(work.in_float64(), max(args.ks), device)
        else:
            checkers[name] = checking_operator(work, device)
        for k in args.ks:
            case = Case(work, k)
            if reference is not None:
                values, case.op64, case.reference_residual = reference
                case.reference = values[:k]
            cases.append(case)
    for number, methods in enumerate(ROUNDS):
        # After the first round, the cheapest cases first (by auto's time): a budget that runs out
        # then leaves the fewest verdicts undecided.
        order = cases if number == 0 else sorted(cases, key=auto_seconds)
        for case in order:
            for method in methods:
                if method not in args.methods:
                    continue
                row = run_one(case, method, args, checkers.get(case.work.name))
                case.rows[method] = row
                print(f"  {case.work.name} top-{case.k} {method:14s} {_fmt_row(row)}", flush=True)
                write(args.markdown, report(header, cases, args))
    text = report(header, cases, args)
    print(text, flush=True)
    write(args.markdown, text)


if __name__ == "__main__":
    main()
