"""Keeping each micro-batch's work (forward pass and first-order graphs) for the next products.

A Hessian-vector product by double backward costs a forward pass, a backward pass that builds
the gradient's graph, and a backward pass through that graph. Only the last one depends on the
vector: while the model and the data are fixed (inside :meth:`Operator.frozen`, which every
solver and estimator of this package enters), the first two can be done once per micro-batch and
their graph reused, which makes a product 1.4-1.7x cheaper on the CPU benchmarks
(benchmarks/hvp_backends.py). The Gauss-Newton operator keeps its forward pass and graphs the
same way, the empirical Fisher its per-sample gradients.

The graphs hold every tensor the backward passes need (activations and their derivatives), so
they are kept only within a memory budget, measured while they are built.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from ..utils import logger

# Budget of kept graphs on a CPU, and as a share of the free memory of a GPU.
DEFAULT_CPU_GRAPH_BYTES = 2 * 2**30
DEFAULT_GPU_GRAPH_SHARE = 0.4


def default_graph_budget(device: torch.device) -> int:
    """Bytes the kept graphs may take by default on ``device``."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * DEFAULT_GPU_GRAPH_SHARE)
    return DEFAULT_CPU_GRAPH_BYTES


class SavedBytes:
    """Bytes of the distinct storages autograd saved for backward while :func:`counting_saved_bytes` ran."""

    def __init__(self, exclude: Sequence[Tensor]) -> None:
        self._seen: set[int] = {_storage_key(t) for t in exclude}
        self.total = 0

    def add(self, tensor: Tensor) -> None:
        key = _storage_key(tensor)
        if key in self._seen:
            return
        self._seen.add(key)
        self.total += tensor.untyped_storage().nbytes()


def _storage_key(tensor: Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
        return id(tensor)


def tensor_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the tensors among ``tensors`` (other items count nothing)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, Tensor))


class SavedTensorHooksRefused(RuntimeError):
    """The model runs ``torch.func`` transforms, which refuse saved-tensor hooks, so the memory of
    its graphs cannot be measured."""


@contextlib.contextmanager
def counting_saved_bytes(exclude: Sequence[Tensor]) -> Iterator[SavedBytes]:
    """Count the memory of the tensors autograd saves in this block, except those sharing storage
    with ``exclude`` (parameters and inputs, which are held anyway).

    The hook stores a detached alias: storing the tensor itself would tie a saved output to its
    own graph node in a cycle that is never freed. Autograd re-attaches the graph when it unpacks
    the alias, so the second derivatives through saved outputs stay exact. Autograd's own check
    that a saved tensor was not modified in place does not see through the alias, so the hook
    repeats it with the tensor's version counter (which the alias shares).

    Raises :class:`SavedTensorHooksRefused` where ``torch.func`` inside the model refuses the hooks.
    """
    counter = SavedBytes(exclude)

    def pack(tensor: Tensor) -> tuple[Tensor, int]:
        counter.add(tensor)
        return tensor.detach(), tensor._version

    def unpack(packed: tuple[Tensor, int]) -> Tensor:
        tensor, version = packed
        if tensor._version != version:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: a tensor of shape {tuple(tensor.shape)} is at version {tensor._version}; expected "
                f"version {version} instead. The model (or its data) changes a tensor that autograd saved; "
                f"compute it out of place."
            )
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield counter
    except RuntimeError as exc:
        if "saved tensor hooks" in str(exc):
            raise SavedTensorHooksRefused(str(exc)) from exc
        raise


def model_state_key(model: nn.Module) -> tuple:
    """A value that changes when a parameter or buffer of ``model`` is changed in place or replaced,
    or a module switches between train and eval mode (the kept graphs are then stale).

    It reads version counters and data pointers, so in-place writes that bump no version are not
    seen: through ``.data`` (``p.data.mul_(2)``) and by fused optimizer kernels (``fused=True``).
    The graphs are kept only inside :meth:`Operator.frozen`, whose caller promises not to change
    the model.
    """
    tensors = [(t._version, t.data_ptr()) for t in model.parameters()]
    tensors += [(t._version, t.data_ptr()) for t in model.buffers()]
    return tuple(tensors), tuple(m.training for m in model.modules())


class KeptGraphs:
    """What products keep per micro-batch (a first-order graph, per-sample gradients, ...), by the
    micro-batch's key (its batch's position in the dataloader, its number within that batch).

    Work is added while it fits ``budget`` bytes; micro-batches past the budget are computed
    afresh in every product. ``key`` is the model state the work was built for.
    """

    def __init__(self) -> None:
        self.graphs: dict[tuple[int, int], Any] = {}
        self.bytes = 0
        self.full = False  # the budget is spent: build no more in this frozen block
        self.key: Optional[tuple] = None

    def __len__(self) -> int:
        return len(self.graphs)

    def get(self, position: tuple[int, int]) -> Optional[Any]:
        return self.graphs.get(position)

    def add(self, position: tuple[int, int], graph: Any, size: int, budget: int) -> bool:
        """Keep ``graph`` if it fits the budget; return whether it was kept."""
        if self.full or self.bytes + size > budget:
            self.full = True
            return False
        self.graphs[position] = graph
        self.bytes += size
        return True

    def give_up(self) -> None:
        """Free everything kept and keep nothing more in this frozen block (out of memory)."""
        self.graphs = {}
        self.bytes = 0
        self.full = True

    def clear(self) -> None:
        self.graphs = {}
        self.bytes = 0
        self.full = False
        self.key = None


class WorkKeeper:
    """Keeps the work a model operator builds per micro-batch inside :meth:`Operator.frozen`, within
    a memory budget, and builds it afresh where it cannot be kept.

    Args:
        owner: the operator's name, for log messages.
        device: where the work lives (its default budget depends on it).
        budget: bytes the kept work may take (None: :func:`default_graph_budget`, read when the
            first work of a frozen block is kept).
    """

    def __init__(self, owner: str, device: torch.device, budget: Optional[int]) -> None:
        self.owner = owner
        self.device = device
        self.budget = budget
        self.kept = KeptGraphs()
        self._budget: Optional[int] = None
        self.refused = False  # the model refuses the hooks that measure kept work: keep nothing, ever

    def __len__(self) -> int:
        return len(self.kept)

    def start(self, key: tuple) -> None:
        """A product that keeps work for the model state ``key`` begins: work kept for another state goes."""
        if self.kept.key != key:
            if len(self.kept):
                logger.info("%s: the model changed inside frozen(); rebuilding the kept graphs.", self.owner)
            self.kept.clear()
            self.kept.key = key

    def get_or_build(
        self,
        position: tuple[int, int],
        build: Callable[[], Any],
        outputs_bytes: Callable[[Any], int],
        held: Sequence[Tensor],
        measure_saved: bool,
        all_or_nothing: bool,
        rewind: Callable[[], None],
    ) -> tuple[Any, bool]:
        """The kept work of the micro-batch at ``position``, or ``build()`` it and keep it if it fits.
        Returns (work, whether it is kept).

        Its size is what autograd saved while building it (``measure_saved``; tensors sharing
        storage with ``held``, the parameters and inputs, excepted) plus ``outputs_bytes(work)``.
        ``all_or_nothing`` (random layers: kept micro-batches draw no more masks, so the others
        would draw other ones) keeps nothing once one micro-batch does not fit. ``rewind`` puts
        the random state back to where ``build`` started, for a second attempt.
        """
        work = self.kept.get(position)
        if work is not None:
            return work, True
        if self.kept.full:
            return build(), False
        if self._budget is None:
            self._budget = self.budget or default_graph_budget(self.device)
        try:
            if measure_saved:
                with counting_saved_bytes(held) as saved:
                    work = build()
                size = saved.total
            else:
                work, size = build(), 0
        except SavedTensorHooksRefused as exc:
            logger.info("%s: the model runs torch.func transforms, which refuse the hooks that measure the "
                        "memory of kept graphs (%s); nothing is kept for it.", self.owner, exc)
            self.refused = True
            self.kept.give_up()
            rewind()  # the failed attempt may have drawn dropout masks
            return build(), False
        except torch.cuda.OutOfMemoryError:
            if not len(self.kept):
                raise  # nothing kept to free: this micro-batch alone does not fit
            self.give_up_out_of_memory()
            rewind()
            return build(), False
        kept = self.kept.add(position, work, size + outputs_bytes(work), self._budget)
        if not kept and all_or_nothing:
            self.kept.give_up()
            logger.info("%s: the kept work does not fit graph_cache_max_bytes=%d bytes, and with "
                        "eval_mode=False it is kept for all micro-batches or none; keeping none.",
                        self.owner, self._budget)
        elif not kept:
            logger.info(
                "%s: the kept work of %d micro-batch(es) fills graph_cache_max_bytes=%d bytes; the others are "
                "computed afresh in every product (raise graph_cache_max_bytes to keep more).",
                self.owner, len(self.kept), self._budget,
            )
        return work, kept

    def give_up_out_of_memory(self) -> None:
        """Out of device memory with work kept: free it, and compute afresh for the rest of the block."""
        logger.warning(
            "%s: out of device memory with %d micro-batch(es) of kept work (%d bytes); freeing them and "
            "computing every product afresh for the rest of this frozen() block. Lower "
            "graph_cache_max_bytes to keep less.", self.owner, len(self.kept), self.kept.bytes,
        )
        self.kept.give_up()

    def release(self) -> None:
        """Free everything kept (the outermost frozen() block ended, or the data changed)."""
        self.kept.clear()
        self._budget = None
