"""A left-padded batched KV cache that requests join and leave between decode steps (hf engine).

Each row of the batch is one sequence; ``mask [B, L]`` marks real cache entries (1) and left padding (0).
Joining left-pads the shorter side to a common length; leaving drops the row and trims columns that
have become padding in every row.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache


def _kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # each [B, kv_heads, L, head_dim]; DynamicCache's layers are DynamicLayer (attention KV) for these models
    return [(layer.keys, layer.values) for layer in cache.layers]


def _left_pad(t: torch.Tensor, length: int) -> torch.Tensor:
    pad = length - t.shape[-2]
    if pad == 0:
        return t
    return torch.cat([t.new_zeros(*t.shape[:-2], pad, t.shape[-1]), t], dim=-2)


class KVBatch:
    def __init__(self) -> None:
        self.kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.mask = torch.zeros(0, 0, dtype=torch.long)  # [B, L]

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    def cache(self) -> DynamicCache:
        """A transformers cache over the current tensors; the model appends one column per step."""
        return DynamicCache(ddp_cache_data=self.kv)

    def after_step(self, cache: DynamicCache) -> None:
        """Adopt the cache the model grew by one column, and mark that column real for every row."""
        self.kv = _kv(cache)
        self.mask = torch.cat([self.mask, torch.ones(self.size, 1, dtype=torch.long)], dim=1)

    def join(self, cache: DynamicCache) -> None:
        """Append one freshly prefilled sequence (a batch-1 cache) as the last row."""
        new = _kv(cache)
        n = new[0][0].shape[-2]
        if self.size == 0:
            self.kv, self.mask = new, torch.ones(1, n, dtype=torch.long)
            return
        length = max(n, self.mask.shape[1])
        self.kv = [
            (torch.cat([_left_pad(k, length), _left_pad(nk, length)]), torch.cat([_left_pad(v, length),
                                                                                  _left_pad(nv, length)]))
            for (k, v), (nk, nv) in zip(self.kv, new, strict=True)
        ]
        row = torch.cat([torch.zeros(length - n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
        old = torch.cat([torch.zeros(self.size, length - self.mask.shape[1], dtype=torch.long), self.mask], dim=1)
        self.mask = torch.cat([old, row.unsqueeze(0)])

    def leave(self, rows: list[int]) -> None:
        """Drop finished rows, then trim leading columns that are padding in every remaining row."""
        keep = [i for i in range(self.size) if i not in set(rows)]
        if not keep:
            self.kv, self.mask = [], torch.zeros(0, 0, dtype=torch.long)
            return
        idx = torch.tensor(keep)
        mask = self.mask[idx]
        first = int((mask.sum(0) > 0).nonzero()[0])  # first column some row still uses
        self.mask = mask[:, first:]
        self.kv = [(k[idx, :, first:], v[idx, :, first:]) for k, v in self.kv]
