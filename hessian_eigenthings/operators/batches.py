"""The data loop of a model operator: a dataloader's batches as micro-batches on the compute device.

:class:`BatchReader` reads every batch (``full_dataset=True``) or the next one (a stochastic
operator), splits batches of more than ``max_possible_gpu_samples`` rows into micro-batches,
moves them to the compute device and, with ``cache_batches``, keeps them there for later
products. It also draws the dataloader's random numbers (shuffling, worker seeds) from a stream of
its own, so that products can put the global random state back without making a shuffling
dataloader repeat one order in every epoch.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple, Optional

import torch
from torch import Tensor

from ..data import BatchSizeFn, leading_dim, move_to, num_samples, slice_samples, split_batch, tensors_in
from ..utils import logger

# What a dataloader's iterator returns here once it is exhausted.
_END = object()


class MicroBatch(NamedTuple):
    """One micro-batch on the compute device, as the data loop yields it.

    Attributes:
        label: names it in messages, e.g. "batch 3 (samples 256:500)".
        inputs, targets: its part of the batch.
        samples: its number of samples (its rows, or what ``batch_size_fn`` counts).
        key: (position of its batch in the dataloader, its number within that batch); the same
            micro-batch has the same key in every product while :attr:`BatchReader.positions_fixed`.
    """

    label: str
    inputs: Any
    targets: Any
    samples: int
    key: tuple[int, int]


class BatchReader:
    """Reads a dataloader's batches as micro-batches on ``device`` (see the module docstring).

    Args:
        dataloader: an iterable of (inputs, targets) batches.
        device: the compute device.
        full_dataset: every batch in each pass (True) or the next batch (False).
        max_possible_gpu_samples: the most rows of a micro-batch.
        batch_size_fn: counts a batch's samples (None: its rows).
        cache_batches: keep the micro-batches on the device for later passes.
        cache_max_bytes: the memory that cache may take.
        owner: the operator's name, for log messages.
    """

    def __init__(
        self,
        dataloader: Any,
        device: torch.device,
        full_dataset: bool,
        max_possible_gpu_samples: int,
        batch_size_fn: Optional[BatchSizeFn],
        cache_batches: bool,
        cache_max_bytes: int,
        owner: str,
    ) -> None:
        self.dataloader = dataloader
        self.device = device
        self.full_dataset = full_dataset
        self.max_possible_gpu_samples = max_possible_gpu_samples
        self.batch_size_fn = batch_size_fn
        self.cache_batches = cache_batches
        self.cache_max_bytes = cache_max_bytes
        self.owner = owner
        # Device copies of the micro-batches, by position of their batch in the dataloader.
        self.cache: dict[int, list[MicroBatch]] = {}
        self.cache_bytes = 0
        self.cache_complete = False  # every batch of the full dataset is in the cache
        self.cache_overflowed = False
        self._batch_iter: Optional[Iterator] = None  # a stochastic operator's place in the dataloader
        self._batch_pos = 0
        self._rng_state: Optional[Tensor] = None  # the dataloader's own random stream (see _on_own_stream)

    # -- what the operator asks --------------------------------------------------------------
    @property
    def keys_reusable(self) -> bool:
        """Whether a micro-batch's key can stand for the same samples in every pass (so that work
        kept by key may be reused): the batches are cached, and either the full dataset is read
        (its set of samples is fixed) or a list/tuple of batches, one per pass."""
        return self._caching()

    @property
    def positions_fixed(self) -> bool:
        """Whether a key holds the same samples from now on: the whole dataset is cached on the device,
        or the dataloader is a list/tuple of batches read one per pass."""
        if self.full_dataset:
            return self.cache_complete
        return isinstance(self.dataloader, (list, tuple)) and self.cache_batches and not self.cache_overflowed

    def clear(self) -> None:
        """Forget the cached micro-batches; the next pass reads the dataloader again."""
        self.cache = {}
        self.cache_bytes = 0
        self.cache_complete = False
        self.cache_overflowed = False

    def micro_batches(self) -> Iterator[MicroBatch]:
        """Yield the micro-batches of one pass, on the compute device.

        With ``cache_batches`` they are kept on the device after they are first read (while they
        fit in ``cache_max_bytes``) and reused, so that later passes neither read the dataloader
        nor copy host to device again.
        """
        if self.full_dataset and self.cache_complete:
            for index in sorted(self.cache):
                yield from self.cache[index]
            return
        # A full pass is kept only once it has completed: a shuffling dataloader puts other samples
        # at the same positions in its next epoch, so a partial cache could not be completed later.
        pending: Optional[dict[int, list[MicroBatch]]] = {} if self._caching() else None
        pending_bytes = 0
        for index, batch in self._batches():
            if index in self.cache:  # only a list/tuple dataloader read one batch at a time gets here
                yield from self.cache[index]
                continue
            parts, added = self._micro_batches_of(index, batch)
            if pending is not None:
                if self.cache_bytes + pending_bytes + added <= self.cache_max_bytes:
                    pending[index] = parts
                    pending_bytes += added
                else:
                    pending = None
                    self.cache_overflowed = True
                    logger.info(
                        "%s: the batches take more than cache_max_bytes=%d bytes on %s, so they are read "
                        "from the dataloader for every product; raise cache_max_bytes to keep them.",
                        self.owner, self.cache_max_bytes, self.device,
                    )
            yield from parts
        if pending is not None:
            self.cache.update(pending)
            self.cache_bytes += pending_bytes
            self.cache_complete = self.full_dataset

    # -- reading -------------------------------------------------------------------------------
    def _caching(self) -> bool:
        """Whether batches read now may be kept for later passes.

        The full dataset is the same set of samples in every pass (the mean over all samples does
        not depend on their order), so its device copies can be reused. One mini-batch per pass
        must follow the dataloader, whose next epoch may be reshuffled or re-augmented; only a
        list or tuple of batches is known to give the same batches again.
        """
        if not self.cache_batches or self.cache_overflowed:
            return False
        return self.full_dataset or isinstance(self.dataloader, (list, tuple))

    def _batches(self) -> Iterator[tuple[int, Any]]:
        """Yield (position in the dataloader, batch): every batch, or the next one when stochastic."""
        if self.full_dataset:
            batches = self._on_own_stream(lambda: iter(self.dataloader))
            index = 0
            while True:
                batch = self._on_own_stream(lambda: next(batches, _END))
                if batch is _END:
                    break
                yield index, batch
                index += 1
            if index == 0:
                raise ValueError(
                    "The dataloader yielded no batches. If it is a one-shot iterator it is exhausted: pass "
                    "a torch DataLoader or a list, which can be read for every product."
                )
            return
        for _ in range(2):
            if self._batch_iter is None:
                self._batch_iter = self._on_own_stream(lambda: iter(self.dataloader))
                self._batch_pos = 0
            batch = self._on_own_stream(lambda: next(self._batch_iter, _END))
            if batch is _END:
                self._batch_iter = None
                continue
            self._batch_pos += 1
            yield self._batch_pos - 1, batch
            return
        raise ValueError(
            "The dataloader yielded no batches (an exhausted iterator cannot be restarted): pass a torch "
            "DataLoader or a list of batches."
        )

    def _on_own_stream(self, read: Callable[[], Any]) -> Any:
        """``read()`` (start or advance the dataloader) drawing from the reader's own stream of the
        global CPU random state, which starts where the global state was at the first read.

        A DataLoader draws from the global generator (a shuffling sampler's permutation, the
        workers' base seed). Products put the global state back when they end, so without a stream
        of its own a reshuffling dataloader would draw the same order in every epoch; and reads
        between products with dropout would shift the masks those draw.
        """
        user_state = torch.get_rng_state()
        if self._rng_state is not None:
            torch.set_rng_state(self._rng_state)
        try:
            return read()
        finally:
            self._rng_state = torch.get_rng_state()
            torch.set_rng_state(user_state)

    def _micro_batches_of(self, index: int, batch: Any) -> tuple[list[MicroBatch], int]:
        """The micro-batches of one dataloader batch on the compute device, and the bytes that
        keeping them would add (device copies, and batches the dataloader made afresh).

        A batch is split along the first dimension that all its tensors share (its rows), into
        micro-batches of at most ``max_possible_gpu_samples`` rows, each weighted by its own
        number of samples. A batch whose tensors share no first dimension (such as inputs (B, T)
        with targets flattened to (B*T,), counted by ``batch_size_fn``) cannot be split exactly,
        so it is used whole, and refused when it holds more than ``max_possible_gpu_samples``.
        """
        inputs, targets = split_batch(batch, index)
        count = num_samples(inputs, targets, index, self.batch_size_fn)
        if count == 0:
            return [], 0
        rows = leading_dim((inputs, targets))
        step = self.max_possible_gpu_samples
        if rows is None and count > step:
            shapes = sorted({tuple(t.shape) for t in tensors_in((inputs, targets))})
            raise ValueError(
                f"Batch {index} holds {count} samples, more than max_possible_gpu_samples={step}, but its tensors "
                f"(shapes {shapes}) share no first dimension to split it along exactly. Raise "
                f"max_possible_gpu_samples to at least {count}, or give every tensor the sample dimension first "
                f"(e.g. targets of shape (B, T), flattened inside the loss) so that it can be split."
            )
        moved_inputs, moved_targets = move_to(inputs, self.device), move_to(targets, self.device)
        # A list/tuple dataloader keeps its own tensors alive: holding them costs nothing more.
        owned = isinstance(self.dataloader, (list, tuple))
        added = _added_bytes((inputs, targets), (moved_inputs, moved_targets), owned)
        if rows is None or rows <= step:
            return [MicroBatch(f"batch {index}", moved_inputs, moved_targets, count, (index, 0))], added
        parts = []
        unit = "samples" if self.batch_size_fn is None else "rows"
        for number, start in enumerate(range(0, rows, step)):
            stop = min(start + step, rows)
            part_inputs = slice_samples(moved_inputs, start, stop)
            part_targets = slice_samples(moved_targets, start, stop)
            samples = stop - start if self.batch_size_fn is None else num_samples(
                part_inputs, part_targets, index, self.batch_size_fn)
            parts.append(MicroBatch(f"batch {index} ({unit} {start}:{stop})", part_inputs, part_targets, samples,
                                    (index, number)))
        counted = sum(part.samples for part in parts)
        if counted != count:
            raise ValueError(
                f"Batch {index}: batch_size_fn counts {count} samples in the batch but {counted} in its micro-batches "
                f"of at most max_possible_gpu_samples={step} rows; it must count the samples of any set of rows "
                f"(e.g. inputs.shape[0], or the targets that are not ignored), so that micro-batches weigh exactly "
                f"what the batch does."
            )
        return parts, added


def _added_bytes(source: Any, moved: Any, owned: bool) -> int:
    """Bytes held by the tensors of ``moved`` that are not already held elsewhere."""
    total = 0
    for original, copy_ in zip(tensors_in(source), tensors_in(moved)):
        if not (owned and copy_ is original):
            total += copy_.numel() * copy_.element_size()
    return total
