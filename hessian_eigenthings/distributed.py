"""Running under torch.distributed: every rank holds a shard of the data, products are all-reduced.

A model operator (HVP, GGN, ...) under an initialised process group computes the sample-weighted
sum of its own shard's products (the plain sum, for a criterion that sums over samples) and joins
ONE all-reduce per product (see :class:`ProductGuard`), so every rank gets the same product of the
Hessian of the mean (or summed) loss over the union of the shards, exact for uneven shards. Solvers then run the same arithmetic on the same numbers on every rank;
the random start and probe vectors are made identical (a shared seed, or a broadcast from rank 0
when the seed is None) and only rank 0 shows progress.

Everything here is an identity or a constant when torch.distributed is unavailable or no process
group is initialised: a single process pays for no collective and no copy. Communication is
torch.distributed's own (gloo for CPU tensors, NCCL for CUDA tensors).
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

logger = logging.getLogger("hessian_eigenthings")

# Status codes each rank puts in its slot of a product's all-reduce.
_OK = 0.0
_OTHER_ERROR = 1.0  # shared error classes get 2.0, 3.0, ... in the order given to ProductGuard


class DistributedError(RuntimeError):
    """A collective failed or timed out, another rank raised during a product, or the ranks
    asked for the products of different vectors."""


def is_distributed(group: Any = None) -> bool:
    """True when torch.distributed is available and a process group is initialised."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    return group is None or group is not torch.distributed.GroupMember.NON_GROUP_MEMBER


def get_rank(group: Any = None) -> int:
    """This process's rank in ``group`` (the default group when None); 0 without a process group."""
    return torch.distributed.get_rank(group) if is_distributed(group) else 0


def get_world_size(group: Any = None) -> int:
    """The number of ranks in ``group`` (the default group when None); 1 without a process group."""
    return torch.distributed.get_world_size(group) if is_distributed(group) else 1


def is_main_process() -> bool:
    """True on global rank 0, and in every process that is not part of a process group.

    The rank that prints progress and writes files.
    """
    return get_rank() == 0


def _comm_device(tensor: Tensor, group: Any) -> torch.device:
    """Where a collective can take ``tensor``: NCCL only moves CUDA tensors."""
    if tensor.device.type == "cpu" and torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def _run_collective(name: str, call: Any, group: Any) -> None:
    try:
        call()
    except RuntimeError as exc:  # torch.distributed.DistBackendError is a RuntimeError
        raise DistributedError(
            f"The {name} across {get_world_size(group)} ranks failed on rank {get_rank(group)}: {exc}. Another "
            f"rank probably raised, stopped, or made a different number of products (every rank must make "
            f"the same calls on its operator and solvers, in the same order). Check the other ranks' "
            f"errors; set timeout= in torch.distributed.init_process_group to bound how long a rank waits."
        ) from exc


def broadcast(tensor: Tensor, src: int = 0, group: Any = None) -> Tensor:
    """``tensor`` with the values it has on rank ``src`` (a global rank), on every rank.

    Returns ``tensor`` itself (filled in place) without a process group, or when it is contiguous
    and on a device the backend can move; otherwise a new tensor on ``tensor``'s device.
    """
    if not is_distributed(group) or get_world_size(group) == 1:
        return tensor
    device = _comm_device(tensor, group)
    buffer = tensor if device == tensor.device and tensor.is_contiguous() else tensor.to(device).contiguous()
    _run_collective("broadcast", lambda: torch.distributed.broadcast(buffer, src=src, group=group), group)
    if buffer is tensor:
        return tensor
    return buffer.to(tensor.device)


def all_reduce_sum(tensor: Tensor, group: Any = None) -> Tensor:
    """The sum of ``tensor`` over the ranks of ``group``, on every rank (``tensor`` itself without
    a process group). Same return convention as :func:`broadcast`."""
    if not is_distributed(group) or get_world_size(group) == 1:
        return tensor
    device = _comm_device(tensor, group)
    buffer = tensor if device == tensor.device and tensor.is_contiguous() else tensor.to(device).contiguous()
    _run_collective("all-reduce", lambda: torch.distributed.all_reduce(buffer, group=group), group)
    if buffer is tensor:
        return tensor
    return buffer.to(tensor.device)


def _buffer_dtype(dtype: torch.dtype) -> torch.dtype:
    # Sample counts are exact in float32 up to 2**24 and half-precision sums lose digits:
    # reduce 16-bit products in float32.
    return dtype if torch.finfo(dtype).bits >= 32 else torch.float32


# Per-rank slots of a product's all-reduce: [count, status, reduction code, sum of squares,
# sampled entries...]. The reduction code says how the rank's criterion combines samples (0: not
# known yet, 1: mean, 2: sum); see operators/reduction.py.
_SAMPLED_ENTRIES = 8
_SLOT_WIDTH = 4 + _SAMPLED_ENTRIES
_REDUCTIONS_BY_CODE = {1: "mean", 2: "sum"}


def _reduce_packed(
    total: Tensor, count: int, status: float, fingerprint: Optional[Tensor], group: Any, reduction_code: int = 0
) -> tuple[Tensor, Tensor]:
    """The one all-reduce of a product: ``total`` (any shape) plus a slot per rank.

    Every rank writes only its own slot, so after the sum each rank sees every rank's entries.
    Returns (summed total, (world, _SLOT_WIDTH) float64 slots on the host).
    """
    world, rank = get_world_size(group), get_rank(group)
    dtype = _buffer_dtype(total.dtype)
    flat = total.reshape(-1)
    size = flat.numel()
    buffer = torch.empty(size + _SLOT_WIDTH * world, dtype=dtype, device=_comm_device(total, group))
    buffer[:size] = flat
    slots = torch.zeros(world, _SLOT_WIDTH, dtype=torch.float64)
    slots[rank, 0] = count
    slots[rank, 1] = status
    slots[rank, 2] = reduction_code
    if fingerprint is not None:
        slots[rank, 3:] = fingerprint.to("cpu", torch.float64)
    buffer[size:] = slots.reshape(-1).to(device=buffer.device, dtype=dtype)
    _run_collective(
        "all-reduce of a Hessian-vector product", lambda: torch.distributed.all_reduce(buffer, group=group), group
    )
    summed = buffer[:size].reshape(total.shape).to(device=total.device, dtype=total.dtype)
    return summed, buffer[size:].reshape(world, _SLOT_WIDTH).to("cpu", torch.float64)


def _fingerprint(mat: Tensor) -> Tensor:
    """What tells whether the ranks multiply the same block: its sum of squares and a few entries
    at fixed positions, shape (1 + _SAMPLED_ENTRIES,)."""
    flat = mat.detach().reshape(-1)
    positions = torch.linspace(0, flat.numel() - 1, _SAMPLED_ENTRIES, device=flat.device).round().long()
    return torch.cat([flat.double().square().sum().reshape(1), flat[positions].double()])


class ProductGuard:
    """Makes one product of a model operator a collective step that every rank finishes together.

    Use as ``with guard: <this rank's data loop>`` then ``total, count, reduction =
    guard.reduce(total, count, vectors, reduction)``. Under a process group (and ``enabled``), an exception raised inside the block is held
    back so that this rank still joins the all-reduce; after it, the rank that raised re-raises its
    own exception and every other rank raises too: the same class if it is one of
    ``shared_errors`` (e.g. NonFiniteError, so a caller that handles it does so on every rank
    alike), :class:`DistributedError` naming the rank otherwise. Nobody waits for a rank that
    failed inside a product. The all-reduce also compares the ranks' input vectors and raises
    :class:`DistributedError` on every rank when they differ (e.g. ``init_vec=torch.randn(n)``
    drawn separately on each rank), since the result would then be no product at all.

    Without a process group, or with ``enabled=False``, the block runs normally (exceptions pass
    through) and ``reduce`` returns its arguments.
    """

    def __init__(self, group: Any = None, enabled: bool = True, shared_errors: Sequence[type] = ()) -> None:
        self.group = group
        self.active = bool(enabled) and is_distributed(group) and get_world_size(group) > 1
        self.shared_errors = tuple(shared_errors)
        self.error: Optional[BaseException] = None

    def __enter__(self) -> "ProductGuard":
        return self

    def __exit__(self, exc_type: Any, exc: Optional[BaseException], tb: Any) -> bool:
        if self.active and isinstance(exc, Exception):
            self.error = exc
            return True  # held; reduce() re-raises it after the collective
        return False

    def _status(self) -> float:
        if self.error is None:
            return _OK
        for index, cls in enumerate(self.shared_errors):
            if isinstance(self.error, cls):
                return _OTHER_ERROR + 1 + index
        return _OTHER_ERROR

    def reduce(
        self, total: Tensor, count: int, vectors: Optional[Tensor], reduction: Optional[str] = None
    ) -> tuple[Tensor, int, Optional[str]]:
        """Sum ``total`` (this rank's weighted product) and ``count`` over the ranks; ONE all-reduce.

        Args:
            total: (n, b) this rank's sum of the micro-batches' products (weighted by their samples
                for a mean loss).
            count: samples behind ``total``.
            vectors: the (n, b) block being multiplied, to check that all ranks agree on it (None:
                nothing to check, e.g. for a gradient).
            reduction: how this rank's criterion combines samples: "mean", "sum", or None where its
                shard could not tell (then the mean and the sum of its products are equal).

        Returns:
            (summed total, summed count, the reduction the ranks agree on). Raises as the class
            docstring says, and :class:`DistributedError` when one rank found a mean and another a sum.
        """
        if not self.active:
            return total, count, reduction
        status = self._status()
        fingerprint = _fingerprint(vectors) if self.error is None and vectors is not None else None
        code = {None: 0, "mean": 1, "sum": 2}[reduction]
        summed, slots = _reduce_packed(total, count, status, fingerprint, self.group, code)
        codes = slots[:, 1].round().long().tolist()
        if self.error is not None:
            raise self.error
        failed = [rank for rank, code in enumerate(codes) if code != 0]
        if failed:
            rank, code = failed[0], codes[failed[0]]
            shared = code - 2
            if 0 <= shared < len(self.shared_errors):
                raise self.shared_errors[shared](
                    f"Rank {rank} raised {self.shared_errors[shared].__name__} in this product (its own "
                    f"error has the details); every rank stops here so that none waits for it."
                )
            raise DistributedError(
                f"Rank{'s' if len(failed) > 1 else ''} {', '.join(map(str, failed))} raised an exception in "
                f"this product (see {'their' if len(failed) > 1 else 'its'} own traceback); every rank stops "
                f"here so that none waits for it."
            )
        if vectors is not None:
            self._check_same_vectors(slots[:, 3:], total.dtype, vectors.numel())
        found = {_REDUCTIONS_BY_CODE[c] for c in slots[:, 2].round().long().tolist() if c}
        if len(found) > 1:
            raise DistributedError(
                "The ranks disagree on how the criterion combines samples: some found a mean, others a sum "
                "(from their own shards). Pass reduction='mean' or reduction='sum' to the operator."
            )
        return summed, int(round(float(slots[:, 0].sum()))), found.pop() if found else reduction

    def _check_same_vectors(self, prints: Tensor, dtype: torch.dtype, numel: int) -> None:
        # Ranks that run the same deterministic solver agree bit for bit; the slack only allows for
        # round-off on ranks whose arithmetic differs (threads, hardware), not for other vectors.
        slack = torch.finfo(_buffer_dtype(dtype)).eps ** 0.5
        reference = prints[0]
        tiny = torch.finfo(torch.float64).tiny
        rms = (reference[0] / max(numel, 1)).sqrt()
        scale = torch.cat([reference[:1].abs(), torch.maximum(reference[1:].abs(), rms)]).clamp_min(tiny)
        differ = ((prints - reference).abs() > slack * scale).any(dim=1)
        if bool(differ.any()):
            ranks = differ.nonzero().reshape(-1).tolist()
            raise DistributedError(
                f"The ranks asked for the products of different vectors (rank{'s' if len(ranks) > 1 else ''} "
                f"{', '.join(map(str, ranks))} differ{'' if len(ranks) > 1 else 's'} from rank 0), so the "
                f"all-reduced result would be meaningless. Give every rank the same vectors: use a fixed "
                f"seed, or broadcast them from rank 0 (hessian_eigenthings.distributed.broadcast); solvers "
                f"do this for their own random vectors."
            )


def unwrap_model(model: Any) -> Any:
    """The module inside a ``DistributedDataParallel`` wrapper; any other model as given.

    Model operators compute with the wrapped module itself, whose parameters are the very same
    tensors: DDP's forward would otherwise broadcast buffers and prepare a gradient all-reduce
    on every forward pass, collectives that ranks with different numbers of micro-batches
    would not match, and the products never touch ``.grad`` anyway.
    """
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def shard_indices(num_samples: int, rank: Optional[int] = None, world_size: Optional[int] = None) -> range:
    """The contiguous block of sample indices that ``rank`` holds when ``num_samples`` are split over
    ``world_size`` ranks as evenly as possible (the first ``num_samples % world_size`` ranks hold one
    more). Defaults: this process's rank and world size.

    Unlike ``torch.utils.data.DistributedSampler`` (which pads the shards to equal length by
    repeating samples unless ``drop_last=True``), every sample is held by exactly one rank, so the
    distributed Hessian is exactly the Hessian over the dataset.
    """
    num_samples = int(num_samples)
    rank = get_rank() if rank is None else int(rank)
    world_size = get_world_size() if world_size is None else int(world_size)
    if num_samples < 0 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(
            f"shard_indices needs num_samples >= 0, world_size >= 1 and 0 <= rank < world_size; got "
            f"num_samples={num_samples}, rank={rank}, world_size={world_size}."
        )
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))
