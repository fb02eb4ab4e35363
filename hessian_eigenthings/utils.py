"""Small shared helpers: the package logger, progress bars and argument checks."""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import sys
from typing import Any, Iterable, Iterator, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from .distributed import broadcast, is_main_process

logger = logging.getLogger("hessian_eigenthings")


def progress(
    iterable: Optional[Iterable] = None,
    total: Optional[int] = None,
    desc: str = "",
    verbose: bool = True,
    leave: bool = True,
) -> tqdm:
    """A tqdm bar that is silenced (not even created on the terminal) when ``verbose`` is False, and
    on every rank but 0 under torch.distributed (the ranks run the same steps; one bar is enough)."""
    return tqdm(
        iterable, total=total, desc=desc, disable=not verbose or not is_main_process(), leave=leave,
        dynamic_ncols=True,
    )


@contextlib.contextmanager
def preserved_global_rng() -> Iterator[None]:
    """Run a block and put torch's global random state back afterwards, also when it raises: the CPU
    generator, and the generator of every CUDA device once CUDA is initialised. Model operators
    run every product in one (a DataLoader's iterator, dropout and a random loss all draw from
    it), and so does every solver and estimator of this package."""
    cpu = torch.get_rng_state()
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = [torch.cuda.get_rng_state(device) for device in range(torch.cuda.device_count())]
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            for device, state in enumerate(cuda):
                torch.cuda.set_rng_state(state, device)


def private_generator(seed: Optional[int]) -> torch.Generator:
    """A CPU generator of our own, so that random start and probe vectors never touch the global RNG.

    ``seed=None`` seeds it from fresh OS entropy; under torch.distributed rank 0's seed is then
    broadcast (one collective, so every rank must call this), so every rank draws the same numbers.
    """
    if seed is not None:
        seed = check_seed(seed)
    gen = torch.Generator(device="cpu")
    if seed is None:
        fresh = torch.tensor([gen.seed() & (2**62 - 1)], dtype=torch.int64)
        gen.manual_seed(int(broadcast(fresh, src=0)[0]))
    else:
        gen.manual_seed(seed)
    return gen


def check_seed(seed: Any) -> int:
    """``seed`` as an int (an integer, or a float with an integral value), or a TypeError saying what to pass."""
    if isinstance(seed, float) and seed.is_integer():
        return int(seed)
    if not isinstance(seed, bool):
        try:
            return operator.index(seed)
        except TypeError:
            pass
    raise TypeError(f"seed must be an integer (or None for fresh randomness), got {seed!r} of type {type(seed).__name__}.")


def check_positive_int(value: Any, name: str) -> int:
    """Return ``value`` as an int, or raise a TypeError/ValueError naming ``name``."""
    if isinstance(value, (bool, float)):
        raise TypeError(f"{name} must be a positive integer, got {value!r} of type {type(value).__name__}.")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{name} must be a positive integer, got {value!r} of type {type(value).__name__}."
        ) from None
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}.")
    return value


def check_bool(value: Any, name: str) -> bool:
    """Return ``value`` if it is a bool (or a numpy bool), else raise a TypeError naming ``name``.

    Strings such as ``"False"`` or ``"no"`` are truthy in Python, so accepting them would silently
    turn an option on; they are refused instead.
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} of type {type(value).__name__}.")


def check_num_eigenthings(k: Any, n: int, name: str = "num_eigenthings") -> int:
    """Validate the number of requested eigenpairs against the operator size ``n``."""
    k = check_positive_int(k, name)
    if k >= n:
        raise ValueError(
            f"{name}={k} must be smaller than the operator size n={n}. Iterative solvers find a few "
            f"eigenpairs of a large operator; for all n eigenpairs of a small one, form the dense "
            f"matrix and use torch.linalg.eigh (see hessian_eigenthings.dense_matrix)."
        )
    return k


VALID_WHICH = ("LM", "LA", "SA")


def check_which(which: Any) -> str:
    """Validate the eigenvalue selector: "LM" (largest magnitude), "LA" (largest algebraic) or "SA"."""
    if not isinstance(which, str) or which.upper() not in VALID_WHICH:
        raise ValueError(
            f"which={which!r} is not supported; use one of 'LM' (largest magnitude), "
            f"'LA' (largest algebraic) or 'SA' (smallest algebraic)."
        )
    return which.upper()


def resolve_device(device: Any) -> torch.device:
    """Turn a user-given device spec into a torch.device, with a clear error for CUDA without a GPU."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device={device!r} is not a valid torch device (e.g. 'cpu' or 'cuda:0').") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asks for CUDA, but torch.cuda.is_available() is False here.")
    return dev


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a warning raised by the caller point at the user's own line:
    the first frame outside this package, however deep inside it the warning is raised."""
    level = 1
    frame = sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level
