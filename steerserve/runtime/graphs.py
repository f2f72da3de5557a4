"""CUDA-graph capture of one steered step (``tests/test_cuda_graph.py``, ``benchmarks/gpu_runtime.py``).

A captured step reads the tables, bank and registers at their fixed addresses: the host rewrites them
between replays (``StepTables.fill`` without ``bank``, so that no per-step tensor is baked into the graph)
and the replay follows. The shapes (tokens, slot widths) are those of the capture.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def capture_step(step: Callable[[], T], reset: Callable[[], None] | None = None,
                 warmup: int = 1) -> tuple[torch.cuda.CUDAGraph, T]:
    """Warm ``step`` up on a side stream (capture requires it), then capture one call of it.

    ``reset`` runs before each warm-up call and before the capture (state the step mutates, e.g. registers),
    on the capturing stream. Returns the graph and the captured call's output, whose tensors every
    ``graph.replay()`` overwrites.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            if reset is not None:
                reset()
            step()
    torch.cuda.current_stream().wait_stream(side)
    if reset is not None:
        reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph, out
