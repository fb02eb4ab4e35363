"""Sharpness tracking in any training loop: one call per step, warm-started, logged as it goes."""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..operators.base import Operator
from ..operators.hvp import HVPOperator
from ..operators.model_operator import ModelOperator
from ..operators.options import DEFAULT_MAX_POSSIBLE_GPU_SAMPLES, check_operator_options
from ..operators.preconditioned import PreconditionedOperator, adam_preconditioner
from ..utils import check_num_eigenthings, check_positive_int, check_which, logger
from .extras import BUILTIN_EXTRAS, KNOWN_EXTRAS, TrackingContext, builtin_extras, check_extra_values, preserved_rng_state
from .log import RECORD_FIELDS, PathLike, SharpnessRecord, TrackingLog
from .solve import SolverSpec, TrackingSolver

ExtrasHook = Callable[[TrackingContext], Any]
Preconditioner = Union[torch.optim.Optimizer, Callable[[], Tensor]]


class SharpnessTracker:
    """Top eigenvalues of the loss Hessian on a fixed dataloader, every ``every`` training steps.

    Add one line to a training loop::

        tracker = SharpnessTracker(model, fixed_loader, loss_fn, every=10, log_path="sharpness.jsonl")
        for step in range(num_steps):
            tracker.step(step)          # measures when step % every == 0, else returns at once
            ...                         # forward, backward, optimizer.step()

    or let the optimizer call it after each update: ``tracker.attach(optimizer)``.

    Each tracked step is warm-started from the previous step's eigenvectors, appends a
    :class:`SharpnessRecord` to the log file (synced to disk) and then to ``records``, and leaves
    the model (parameters, buffers, ``.grad``, modes), the optimizer's state and the global random
    states (torch CPU and CUDA, ``random``, ``numpy``) exactly as they were.

    With a ``log_path`` the tracker locks the file while it is open: a second tracker on the same
    file, in this process or another, is refused (:class:`TrackingLogInUseError`). :meth:`close`
    (or the end of a ``with SharpnessTracker(...) as tracker:`` block) releases it; so do garbage
    collection and the end of the process. A record that cannot be written (a full disk) raises
    :class:`TrackingLogWriteError` and is not kept anywhere, so the step can be measured again.

    Args:
        model: the network being trained.
        dataloader: the fixed data the Hessian is measured on: an iterable of ``(inputs, targets)``
            batches that can be read again each time (a DataLoader without shuffling, a list). The
            Hessian is that of the mean loss over all of its samples.
        criterion: ``criterion(outputs, targets)`` returning the batch-mean loss.
        every: track when ``step % every == 0``.
        num_eigenthings: k, how many eigenvalues per record.
        which: "LA" (largest, default: the sharpness), "SA" (most negative) or "LM".
        solver: a mode of ``compute_hessian_eigenthings`` ("lanczos" default, "power_iter", or a
            native solver's name) or a callable ``solver(operator, num_eigenthings, which=...,
            init_vecs=... or init_vec=..., tol=..., **solver_kwargs)`` returning an ``EigenResult``
            or ``(eigenvalues, eigenvectors)``. See :mod:`hessian_eigenthings.tracking.solve` for
            how the warm start and tolerance are passed, and why "lanczos" is the default.
        tol: relative residual tolerance ``||A v - lambda v|| <= tol * |lambda|``.
        solver_kwargs: extra keyword arguments for the solver.
        log_path: ``.jsonl`` or ``.csv`` file to append records to; None keeps them in memory only.
        if_exists: an existing log file is an "error" (default), is continued ("resume": its records
            are read back, steps up to its last are skipped, and the warm start is restored from
            ``<log>.vectors.pt``), or is replaced ("overwrite"). An empty file counts as absent.
        save_vectors: keep the last eigenvectors in ``<log>.vectors.pt`` (k * n numbers) for a warm
            resume.
        builtin_extras: which of "loss" (mean loss over the dataloader), "grad_norm" (norm of its
            gradient) and "trace" (the Hessian trace by Hutch++, with "trace_std_error") each record
            carries. The default is ("loss", "grad_norm"): one extra forward and backward pass
            together; "trace" is opt-in and costs ``trace_products`` Hessian-vector products.
        trace_products: the Hutch++ budget of the "trace" extra (its error falls like 1/products on
            a Hessian with a few outlier eigenvalues). The trace is of H, also with a preconditioner.
        extras: a hook ``hook(ctx: TrackingContext) -> dict`` or a list of them, called at each tracked
            step; the numbers they return join the record (e.g. a trace estimate of ``ctx.hessian``).
        preconditioner: track the preconditioned sharpness, the top eigenvalues of
            ``P^{-1/2} H P^{-1/2}`` (those of ``P^{-1} H``): a ``torch.optim.Adam``/``AdamW`` (P is its
            denominator ``sqrt(v_hat) + eps``, read from its state at every tracked step; see
            :func:`~hessian_eigenthings.operators.preconditioned.adam_preconditioner`), or a function
            returning the diagonal of P as a (n,) tensor. Steps before Adam's first update have no
            preconditioner and are skipped.
        operator_cls: the curvature operator class (default :class:`HVPOperator`); any
            :class:`ModelOperator` subclass with the same constructor works.
        use_gpu, fp16, max_possible_gpu_samples, params, eval_mode, device, check_finite: passed to
            the operator (see :class:`HVPOperator`).
        **operator_options: any other keyword option of ``operator_cls`` (``reduction``,
            ``batch_size_fn``, ``precision``, ...), passed to it.
        verbose: show the solver's progress bar at each tracked step.
    """

    def __init__(
        self,
        model: nn.Module,
        dataloader: Any,
        criterion: Callable[[Any, Any], Tensor],
        *,
        every: int = 1,
        num_eigenthings: int = 1,
        which: str = "LA",
        solver: SolverSpec = "lanczos",
        tol: float = 1e-4,
        solver_kwargs: Optional[dict] = None,
        log_path: Optional[PathLike] = None,
        if_exists: str = "error",
        save_vectors: bool = True,
        builtin_extras: Sequence[str] = BUILTIN_EXTRAS,
        trace_products: int = 60,
        extras: Optional[Union[ExtrasHook, Sequence[ExtrasHook]]] = None,
        preconditioner: Optional[Preconditioner] = None,
        operator_cls: type = HVPOperator,
        use_gpu: bool = True,
        fp16: bool = False,
        max_possible_gpu_samples: Optional[int] = DEFAULT_MAX_POSSIBLE_GPU_SAMPLES,
        params: Any = None,
        eval_mode: bool = True,
        device: Any = None,
        check_finite: bool = True,
        verbose: bool = False,
        **operator_options: Any,
    ) -> None:
        self.every = check_positive_int(every, "every")
        self.which = check_which(which)
        tol = float(tol)
        if not tol > 0:
            raise ValueError(f"tol must be positive (a relative residual such as 1e-4), got {tol}.")
        if not (isinstance(operator_cls, type) and issubclass(operator_cls, ModelOperator)):
            raise TypeError(f"operator_cls must be a ModelOperator subclass such as HVPOperator, got {operator_cls!r}.")
        check_operator_options("SharpnessTracker", operator_cls, operator_options)
        self.builtin_extras = _check_builtin(builtin_extras)
        self.trace_products = check_positive_int(trace_products, "trace_products")
        self.extras_hooks = _check_hooks(extras)
        if preconditioner is not None and not (
            isinstance(preconditioner, (torch.optim.Adam, torch.optim.AdamW)) or
            (callable(preconditioner) and not isinstance(preconditioner, torch.optim.Optimizer))
        ):
            raise TypeError(
                f"preconditioner must be a torch.optim.Adam / AdamW or a function returning P's diagonal, got "
                f"{type(preconditioner).__name__}."
            )
        self.preconditioner = preconditioner
        self.model = model
        self.dataloader = dataloader
        self.criterion = criterion
        self.hessian: ModelOperator = operator_cls(
            model, dataloader, criterion, use_gpu=use_gpu, fp16=fp16, full_dataset=True,
            max_possible_gpu_samples=max_possible_gpu_samples, params=params, eval_mode=eval_mode,
            device=device, check_finite=check_finite, **operator_options,
        )
        self.num_eigenthings = check_num_eigenthings(num_eigenthings, self.hessian.size)
        if isinstance(preconditioner, torch.optim.Optimizer):
            optimised = {id(p) for group in preconditioner.param_groups for p in group["params"]}
            missing = [name for name, p in zip(self.hessian.param_names, self._tracked_parameters())
                       if id(p) not in optimised]
            if missing:
                raise ValueError(
                    f"preconditioner: the optimizer does not optimise {', '.join(missing[:5])}"
                    f"{' ...' if len(missing) > 5 else ''}, so it has no preconditioner for them. Pass the optimizer "
                    f"that trains these parameters, or choose params= among the ones it trains."
                )
        self.solver = TrackingSolver(solver, self.which, tol, solver_kwargs, verbose=verbose)
        self.tol = tol
        self.records: list[SharpnessRecord] = []
        self.eigenvectors: Optional[Tensor] = None
        self.log: Optional[TrackingLog] = None
        self._hook_handles: list[Any] = []
        self._closed = False
        if log_path is not None:
            # Last, so that nothing can fail while the file is locked but not yet owned by the tracker.
            log = TrackingLog(log_path, if_exists=if_exists, save_vectors=save_vectors)
            try:
                self._resume(log)
            except BaseException:
                log.close()
                raise
            self.log = log

    # -- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Release the log file (its lock) and detach from optimizers (:meth:`attach`).

        ``records`` stay readable; :meth:`step` refuses afterwards. Safe to call twice. The log file
        is also released when the tracker is garbage-collected and when the process exits.
        """
        for handle in self._hook_handles:
            handle.remove()
        self._hook_handles.clear()
        if self.log is not None:
            self.log.close()
        self._closed = True

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran."""
        return self._closed

    def __enter__(self) -> "SharpnessTracker":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # -- state ---------------------------------------------------------------------------------
    @property
    def last_step(self) -> Optional[int]:
        """The step of the last record (also one read back from a resumed log), or None."""
        return self.records[-1].step if self.records else None

    @property
    def last_record(self) -> Optional[SharpnessRecord]:
        """The newest :class:`SharpnessRecord` (also one read back from a resumed log), or None."""
        return self.records[-1] if self.records else None

    def due(self, step: int) -> bool:
        """Whether ``step(step)`` would measure: a multiple of ``every`` after the last recorded step."""
        return step % self.every == 0 and (self.last_step is None or step > self.last_step)

    # -- tracking ------------------------------------------------------------------------------
    def step(self, step: int, force: bool = False) -> Optional[SharpnessRecord]:
        """Measure at training step ``step`` if it is due (``step % every == 0``, or ``force``).

        Steps at or before the last recorded one are skipped (records stay in increasing step order,
        which is what lets a resumed run re-execute steps it had already tracked).

        Returns:
            The new :class:`SharpnessRecord`, or None when nothing was measured.

        Raises:
            TrackingLogWriteError: the record could not be written to the log file; it was kept
                nowhere (neither in ``records`` nor as the next warm start), so calling ``step`` for
                this step again retries it.
        """
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
            raise TypeError(f"step must be an int (the training step counter), got {type(step).__name__}.")
        if self._closed:
            where = f" and its log {str(self.log.path)!r} released" if self.log is not None else ""
            raise RuntimeError(
                f"This SharpnessTracker is closed{where}; make a new one (with if_exists='resume' to continue "
                f"its log)."
            )
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        if self.last_step is not None and step <= self.last_step:
            logger.debug("SharpnessTracker: step %d is not after the last recorded step %d; skipped.", step, self.last_step)
            return None
        if not force and step % self.every != 0:
            return None
        return self._track(step)

    __call__ = step

    def attach(self, optimizer: torch.optim.Optimizer, start_step: int = 0) -> Any:
        """Call ``step`` after every ``optimizer.step()``, counting updates from ``start_step``.

        After the t-th update made through this optimizer, ``step(start_step + t)`` runs, so records
        describe the parameters after that many updates. Returns the hook handle; ``.remove()`` it to
        stop (:meth:`close` removes it too). (Step ``start_step`` itself, before the first update, is
        not recorded by the hook: call ``tracker.step(start_step)`` for it.)
        """
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach needs a torch.optim.Optimizer, got {type(optimizer).__name__}.")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be an int >= 0, got {start_step!r}.")
        if self._closed:
            raise RuntimeError("This SharpnessTracker is closed; make a new one to attach.")
        counter = [start_step]

        def hook(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            counter[0] += 1
            self.step(counter[0])

        handle = optimizer.register_step_post_hook(hook)
        self._hook_handles.append(handle)
        return handle

    def _track(self, step: int) -> Optional[SharpnessRecord]:
        start = time.perf_counter()
        with preserved_rng_state():
            operator = self._operator()
            if operator is None:
                return None
            init = self.eigenvectors
            if init is not None and init.shape[1] != operator.size:
                init = None
            # One frozen block for the solve and the built-in extras, so that the trace estimate
            # reuses the graphs the solver's products kept.
            with self.hessian.frozen():
                outcome = self.solver.solve(operator, self.num_eigenthings, init)
                extras: dict[str, Any] = builtin_extras(self.hessian, self.builtin_extras, self.trace_products)
            context = TrackingContext(
                step, self.model, operator, self.hessian, outcome.eigenvalues, outcome.eigenvectors,
                self.dataloader, self.criterion,
            )
            for hook in self.extras_hooks:
                taken = set(RECORD_FIELDS) | set(extras)
                extras.update(check_extra_values(hook(context), hook, taken))
        record = SharpnessRecord(
            step=step,
            eigenvalues=outcome.eigenvalues.tolist(),
            residuals=outcome.residuals.tolist(),
            converged=outcome.converged.tolist(),
            products=outcome.products,
            seconds=0.0,
            warm=outcome.warm,
            which=self.which,
            preconditioned=self.preconditioner is not None,
            extras=extras,
        )
        record.seconds = time.perf_counter() - start
        # Kept in memory only once on disk: a failed write leaves no trace, so the step can be retried.
        if self.log is not None:
            self.log.append(record, outcome.eigenvectors)
        self.records.append(record)
        self.eigenvectors = outcome.eigenvectors
        logger.info(
            "step %d: eigenvalues %s (%s, %d products, %.3f s)", step,
            np.array2string(outcome.eigenvalues, precision=5), "warm" if outcome.warm else "cold",
            outcome.products, record.seconds,
        )
        return record

    def _operator(self) -> Optional[Operator]:
        """The operator of this step: H, or P^{-1/2} H P^{-1/2} with the current preconditioner."""
        if self.preconditioner is None:
            return self.hessian
        if callable(self.preconditioner) and not isinstance(self.preconditioner, torch.optim.Optimizer):
            diagonal = self.preconditioner()
        else:
            params = self._tracked_parameters()
            if any(p not in self.preconditioner.state or "step" not in self.preconditioner.state[p] for p in params):
                logger.info("SharpnessTracker: the optimizer has not taken a step yet, so there is no "
                            "preconditioner; this step is not recorded.")
                return None
            diagonal = adam_preconditioner(self.preconditioner, params)
        return PreconditionedOperator(self.hessian, diagonal)

    def _tracked_parameters(self) -> list[Tensor]:
        """The user's parameter tensors behind the operator's flat layout (those the optimizer holds).

        Looked up by name in the operator's own model, which is the user's module with a
        DistributedDataParallel wrapper taken off (its names have no ``module.`` prefix); the
        operator's ``_params`` may belong to a device copy, which no optimizer knows.
        """
        by_name = dict(self.hessian.model.named_parameters())
        return [by_name[name] for name in self.hessian.param_names]

    def _resume(self, log: TrackingLog) -> None:
        if not log.resumed:
            return
        ks = {len(r.eigenvalues) for r in log.resumed}
        whiches = {r.which for r in log.resumed}
        preconditioned = {r.preconditioned for r in log.resumed}
        if ks != {self.num_eigenthings} or whiches != {self.which} or preconditioned != {self.preconditioner is not None}:
            raise ValueError(
                f"Cannot resume {str(log.path)!r}: its records have num_eigenthings {sorted(ks)}, which "
                f"{sorted(whiches)}, preconditioned {sorted(preconditioned)}, but this tracker has "
                f"{self.num_eigenthings}, {self.which!r}, {self.preconditioner is not None}. Use the same settings "
                f"or another log_path."
            )
        self.records = list(log.resumed)
        saved = log.read_vectors(self.hessian.size)
        if saved is not None and saved[0] > self.last_step:
            logger.warning("%s holds the eigenvectors of step %d, after the log's last record (step %d); the next "
                           "tracked step starts cold.", log.vectors_path, saved[0], self.last_step)
            saved = None
        if saved is not None:
            saved_step, vectors = saved
            self.eigenvectors = vectors.to(device=self.hessian.device, dtype=self.hessian.dtype)
            logger.info("Resumed %s at step %d with the warm start of step %d.", log.path, self.last_step, saved_step)
        else:
            logger.info("Resumed %s at step %d; no saved eigenvectors, so the next step starts cold.",
                        log.path, self.last_step)


def _check_builtin(names: Iterable[str]) -> tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    names = tuple(names)
    unknown = [name for name in names if name not in KNOWN_EXTRAS]
    if unknown:
        raise ValueError(
            f"builtin_extras: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(map(repr, KNOWN_EXTRAS))} "
            f"(or () for none). Other measurements go in an extras hook."
        )
    return tuple(dict.fromkeys(names))


def _check_hooks(extras: Any) -> list[ExtrasHook]:
    if extras is None:
        return []
    hooks = [extras] if callable(extras) else list(extras)
    for hook in hooks:
        if not callable(hook):
            raise TypeError(f"extras must be a callable hook(ctx) -> dict or a list of them, got {type(hook).__name__}.")
    return hooks
