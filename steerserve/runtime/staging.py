"""Double-buffered host staging for the per-step tables' host-to-device copies (CUDA).

From pageable numpy memory, a host-to-device copy is synchronous: the host waits for the device to drain
before the step's tables move. From pinned memory the copy is enqueued (``non_blocking``) and the host
returns at once, so the next step's host work overlaps this step's kernels. The price: the host must not
rewrite a pinned buffer while a copy enqueued from it may still be pending. Two buffers alternate by step;
after enqueueing a step's copies from buffer ``b`` a fence (a CUDA event) is recorded, and before buffer
``b`` is written again, two steps later, the host waits on that fence: by then the copies almost always
ran, so the wait costs nothing, and the step in between never waits on the one before it.

On CPU nothing here is used (``StepTables`` copies straight from its numpy arrays, as before); tests build
it on CPU, unpinned, with a fake fence, to check the alternation and the waits.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Protocol

import numpy as np
import torch


class Fence(Protocol):
    """What ``torch.cuda.Event`` offers and the staging needs."""

    def record(self) -> None: ...

    def synchronize(self) -> None: ...


def cuda_fence() -> Fence:
    return torch.cuda.Event()


class HostStaging:
    """Two sets of flat host buffers, one per name (``sizes``: name -> (elements, dtype)), used by turns.

    A step calls ``begin`` (picks the other buffer set, waiting on its fence), ``copy`` for each table
    (pack into this set, enqueue the copy) and ``end`` (record this set's fence).
    """

    def __init__(self, sizes: Mapping[Hashable, tuple[int, torch.dtype]], pin: bool,
                 fence: Callable[[], Fence] | None = None) -> None:
        self._bufs = [{name: torch.empty(n, dtype=dtype, pin_memory=pin) for name, (n, dtype) in sizes.items()}
                      for _ in range(2)]
        self._fences: list[Fence | None] = [None, None]
        self._fence = fence
        self.index = 1  # the set in use; the first ``begin`` takes set 0
        self.steps = 0

    def begin(self) -> int:
        """Start a step on the other buffer set, once the copies that last read it are done."""
        self.index ^= 1
        pending = self._fences[self.index]
        if pending is not None:
            pending.synchronize()
            self._fences[self.index] = None
        self.steps += 1
        return self.index

    def copy(self, name: Hashable, src: np.ndarray, dst: torch.Tensor) -> None:
        """Pack ``src`` (any shape; strided views allowed) into this set's buffer ``name`` and enqueue its copy
        into ``dst`` (same shape, on the device)."""
        buf = self._bufs[self.index][name][: src.size].view(src.shape)
        np.copyto(buf.numpy(), src)
        dst.copy_(buf, non_blocking=True)

    def end(self) -> None:
        """After the step's copies are enqueued: fence them, so ``begin`` knows when this set is free."""
        if self._fence is not None:
            fence = self._fence()
            fence.record()
            self._fences[self.index] = fence

    def buffer(self, index: int, name: Hashable) -> torch.Tensor:
        """Set ``index``'s flat buffer ``name`` (tests)."""
        return self._bufs[index][name]
