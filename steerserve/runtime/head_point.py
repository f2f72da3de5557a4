"""The head point: per-request ops on the states the output head reads (post-final-norm, one per request).

Both engines compute each request's next-token logits from one post-final-norm state per request (vLLM's
``compute_logits`` on the sampled rows, in batch order; the hf engine's last position). Two things happen
there, per request, with fixed shapes and no host sync (``HeadPoint.apply``):

- **probes** (SafeSwitch): at the step whose sampled row is the request's last prompt token (stage 1) or its
  ``PILOT_TOKENS``-th generated token (stage 2), the request's probe pair gives ``p`` from that state and
  writes it into ``Registers.probe[cell, stage]``. The host reads those between steps, after the pilot, to
  decide whether the request is unsafe (the response reports them too).
- **head**: a request that runs with a refusal head gets ``logits += (h A^T) B^T`` for its row (the head's
  low-rank delta on the model's own head, ``runtime.safeswitch``); other rows are not touched.

Weights live in a few slots (``C`` probe pairs, ``C`` heads), loaded by content key like controllers
(``control_op.ControllerSlots``). Per step the host lists the rows: ``(batch row, cell, probe slot, stage)``
and ``(batch row, head slot)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from steerserve.runtime.control_op import ControllerUnit, RowTable
from steerserve.runtime.controller import ControllerWeights
from steerserve.runtime.registers import Registers
from steerserve.runtime.safeswitch import PROBE_WIDTH, HeadDelta, ProbePair, probe_prob

MAX_RANK = 32  # widest head delta a slot holds (smaller ranks are zero-padded: exact)


class HeadPoint:
    """Probe and head slots, and this step's rows (see the module docstring)."""

    def __init__(self, slots: int, hidden: int, vocab: int, max_rows: int, sink: int,
                 device: torch.device | str = "cpu") -> None:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.float32, device=device)

        self.slots = slots
        # probes: [C, 2 stages, ...]
        self.pw1, self.pb1 = zeros(slots, 2, PROBE_WIDTH, hidden), zeros(slots, 2, PROBE_WIDTH)
        self.pw2, self.pb2 = zeros(slots, 2, 2, PROBE_WIDTH), zeros(slots, 2, 2)
        self.ha, self.hb = zeros(slots, MAX_RANK, hidden), zeros(slots, vocab, MAX_RANK)
        self.probe_keys: list[str | None] = [None] * slots
        self.head_keys: list[str | None] = [None] * slots
        self.probe_rows = RowTable(3, max_rows, (0, sink, 0), device)  # batch row, cell, slot * 2 + stage
        self.head_rows = RowTable(2, max_rows, (0, 0), device)  # batch row, slot

    @property
    def active(self) -> bool:
        return bool(self.probe_rows.count or self.head_rows.count)

    def load_probes(self, slot: int, probes: ProbePair) -> None:
        for stage, p in enumerate((probes.stage1, probes.stage2)):
            self.pw1[slot, stage].copy_(p.w1)
            self.pb1[slot, stage].copy_(p.b1)
            self.pw2[slot, stage].copy_(p.w2)
            self.pb2[slot, stage].copy_(p.b2)
        self.probe_keys[slot] = probes.key

    def load_head(self, slot: int, head: HeadDelta) -> None:
        r = head.a.shape[0]
        if r > MAX_RANK:
            raise ValueError(f"a head delta of rank {r} exceeds the {MAX_RANK} a slot holds")
        self.ha[slot].zero_()
        self.hb[slot].zero_()
        self.ha[slot, :r].copy_(head.a)
        self.hb[slot, :, :r].copy_(head.b)
        self.head_keys[slot] = head.key

    def fill(self, probes: Sequence[tuple[int, int, int, int]], heads: Sequence[tuple[int, int]]) -> None:
        """This step's rows: probes ``(batch row, cell, slot, stage 0|1)``, heads ``(batch row, slot)``."""
        self.probe_rows.fill([(row, cell, slot * 2 + stage) for row, cell, slot, stage in probes])
        self.head_rows.fill(heads)

    def apply(self, h: torch.Tensor, logits: torch.Tensor, regs: Registers) -> None:
        """``h [B, H]`` the post-final-norm states the logits ``[B, V]`` came from (batch order): write the
        probes' ``p`` into ``regs.probe`` and add the heads' deltas to their rows' logits, in place."""
        if self.probe_rows.count:
            rows, cells, which = self.probe_rows.columns()
            x = h.index_select(0, rows).float()  # [r, H]
            stage = which % 2
            p = torch.stack([probe_prob(x, self.pw1[c, s], self.pb1[c, s], self.pw2[c, s], self.pb2[c, s])
                             for c in range(self.slots) for s in range(2)])  # [C * 2, r]
            mine = p.gather(0, which[None, :])[0]  # [r]: each row's own probe
            flat = regs.probe.view(-1)  # [cells * 2]: cell c, stage s at 2c + s
            flat.index_copy_(0, cells * 2 + stage, mine)
        if self.head_rows.count:
            rows, slots = self.head_rows.columns()
            x = h.index_select(0, rows).float()  # [r, H]
            low = torch.einsum("rh,rkh->rk", x, self.ha.index_select(0, slots))  # [r, K]
            delta = torch.einsum("rk,rvk->rv", low, self.hb.index_select(0, slots))  # [r, V]
            logits.index_add_(0, rows, delta.to(logits.dtype))


def load_slot(ctrl: ControllerUnit, head: HeadPoint, slot: int,
              weights: ControllerWeights | ProbePair | HeadDelta) -> None:
    """Copy ``weights`` into ``slot`` of the unit that runs them: a controller into ``ctrl``, probes or a head
    into ``head`` (between steps; both engines load through this)."""
    if isinstance(weights, ControllerWeights):
        ctrl.load(slot, weights)
    elif isinstance(weights, ProbePair):
        head.load_probes(slot, weights)
    else:
        head.load_head(slot, weights)
