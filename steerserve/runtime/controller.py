"""Refusal controllers (Guiding Giants, Hegazy et al. 2505.20309, the paper's version): the weights, and
the read op that runs them inside a step.

A controller is ``Linear(4H, D) - ReLU - Linear(D, 1 + N)`` on the concatenated residual states of four
read layers ``k-3..k`` at a request's **last prompt token**; its outputs give a bounded global scale
``s = sigmoid(o_0)`` and per-layer weights ``w_l = sigmoid(o_{1+l})``. The request's patch is
``h_l[t] += alpha * s * w_l * scale_l * r`` (``r``: a unit refusal direction; ``scale_l``: layer ``l``'s mean
residual norm, so ``alpha`` is in units of a typical state's length, like ``add``'s ``coeff`` on a
direction), at every layer ``l`` of every generated token, and at the layers above ``k`` of the last prompt
token itself. Input standardisation, if the trainer used any, is folded into ``w1``/``b1``.

Why read below the top (the paper reads the last four layers): on a device the decision has to exist
before the patch it scales. The paper runs the prompt twice (decide, then generate with the patch); a
server runs it once, and the last prompt token's state is what picks the first reply token, where a
refusal starts (on the default model a refusal direction added from the first generated token on
refuses far less than one added from the last prompt token on). Reading layers ``k-3..k`` lets the
decision land in the same forward pass, in time for layers ``> k`` of that token.

On the device: a *read* op copies each controlled request's last prompt token at every layer into the
controller unit (``control_op``) and at layer ``k`` writes ``s * w`` into the request's
``Registers.layer_gain`` row, which the request's ``gain`` ops read per layer (``StepTables.layer``).
The host never reads it to decide anything.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

READ_LAYERS = 4  # states the controller reads: this many layers, concatenated ([4H])


@dataclass(frozen=True, eq=False)
class ControllerWeights:
    """One controller: ``w1 [D, 4H]``, ``b1 [D]``, ``w2 [1 + N, D]``, ``b2 [1 + N]`` (fp32, CPU), the layers it
    reads (``READ_LAYERS`` of them, ascending), the unit ``direction [H]`` it modulates and the per-layer
    patch ``scales [N]``."""

    w1: torch.Tensor
    b1: torch.Tensor
    w2: torch.Tensor
    b2: torch.Tensor
    read_layers: tuple[int, ...]
    direction: torch.Tensor
    scales: torch.Tensor

    def __post_init__(self) -> None:
        d, four_h = self.w1.shape
        n = self.scales.shape[0]
        h = self.direction.shape[0]
        shapes = (self.b1.shape, self.w2.shape, self.b2.shape)
        if four_h != READ_LAYERS * h or shapes != ((d,), (1 + n, d), (1 + n,)):
            raise ValueError("controller shapes disagree: w1 [D, 4H], b1 [D], w2 [1+N, D], b2 [1+N], scales [N]")
        if len(self.read_layers) != READ_LAYERS or list(self.read_layers) != sorted(set(self.read_layers)):
            raise ValueError(f"a controller reads {READ_LAYERS} distinct layers, ascending")
        if self.read_layers[0] < 0 or self.read_layers[-1] >= n:
            raise ValueError("read layers out of range")

    @property
    def num_layers(self) -> int:
        return int(self.scales.shape[0])

    @property
    def key(self) -> str:
        """Content hash: requests naming the same weights share one copy on the device."""
        h = hashlib.sha256()
        for t in (self.w1, self.b1, self.w2, self.b2, self.direction, self.scales):
            h.update(t.detach().to(torch.float32).contiguous().numpy().tobytes())
        h.update(repr(self.read_layers).encode())
        return h.hexdigest()[:32]


def controller_outputs(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                       b2: torch.Tensor) -> torch.Tensor:
    """``x [R, 4H]`` -> ``[R, 1 + N]``: column 0 the scale ``s``, columns ``1..N`` the weights ``w_l``, all
    ``sigmoid``-bounded in ``(0, 1)``. The trainer and the device op both call this (same arithmetic)."""
    return torch.sigmoid(torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, w1, b1)), w2, b2))


def layer_gains(out: torch.Tensor) -> torch.Tensor:
    """``[R, 1 + N]`` controller outputs -> ``[R, N]`` the per-layer gains ``s * w_l``."""
    return out[:, :1] * out[:, 1:]
