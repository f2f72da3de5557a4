"""Fitting a refusal controller (Guiding Giants, the paper's version; ``runtime.controller`` fixes the maths).

Two stages, on standardised inputs (the standardisation is folded into ``w1``/``b1`` at the end, ``fold``):

1. ``train_scale``: the whole network on BCE of ``s = sigmoid(o_0)`` (harmful = 1, harmless = 0) plus a small
   regulariser on the weights ``w = sigmoid(o_1..N)``, ``reg * mean(o_1..N ^ 2)``, which holds them near 0.5
   (no task gradient reaches ``w`` here; an L1 price alone would only drive every ``w`` towards 0, as Adam
   steps by about the learning rate whatever the gradient's size, and leave stage 2 saturated sigmoids).
2. ``train_weights``: the per-layer weights end to end. Only the ``w`` head (rows ``1..N`` of ``w2``/``b2``)
   moves; the trunk and ``s`` stay as stage 1 left them. The loss is the reply NLL through the patched
   forward of the frozen model (``tools.controller.reply_nll``: a templated refusal for harmful prompts, the
   model's own greedy reply for harmless ones, each gated by the prompt's own ``s``; the reply tokens the
   patch can reach) plus ``reg * mean(w)``, which prices the patch: ``w`` rises only where it buys refusal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from steerserve.runtime.controller import controller_outputs
from steerserve.tools.train import controller as ct

Log = Callable[[str], None]


class Net(nn.Module):
    """``Linear(4H, D) - ReLU - Linear(D, 1 + N)`` on standardised inputs; ``forward`` gives the logits."""

    def __init__(self, inputs: int, width: int, layers: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(inputs, width), nn.Linear(width, 1 + layers)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc1(x))  # [R, D]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.trunk(x))  # [R, 1 + N]


@dataclass(frozen=True)
class Standardiser:
    """Per-feature ``(x - mean) / std`` of the fitting rows (``std`` floored: no feature is blown up)."""

    mean: torch.Tensor  # [4H]
    std: torch.Tensor  # [4H]

    @staticmethod
    def fit(x: torch.Tensor) -> Standardiser:
        std = x.std(dim=0)
        return Standardiser(x.mean(dim=0), std.clamp(min=1e-2 * float(std.median())))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def train_scale(net: Net, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, batch: int, reg: float,
                seed: int, log: Log, x_sel: torch.Tensor, y_sel: torch.Tensor) -> list[dict[str, float]]:
    """Stage 1 on standardised ``x [R, 4H]``, labels ``y [R]`` (1 = harmful); returns per-epoch figures
    (train loss, selection BCE and accuracy at 0.5)."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    bce = nn.BCEWithLogitsLoss()
    history = []
    for epoch in range(epochs):
        total = 0.0
        for idx in torch.randperm(len(x), generator=gen).split(batch):
            out = net(x[idx])
            loss = bce(out[:, 0], y[idx]) + reg * out[:, 1:].pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        with torch.no_grad():
            o = net(x_sel)[:, 0]
            row = {"epoch": epoch + 1, "train_loss": total / len(x), "select_bce": float(bce(o, y_sel)),
                   "select_acc": float(((o > 0).float() == y_sel).float().mean())}
        history.append(row)
        log(f"  scale epoch {epoch + 1}/{epochs}: train loss {row['train_loss']:.4f}, selection BCE "
            f"{row['select_bce']:.4f}, accuracy {row['select_acc']:.3f}")
    return history


@dataclass(frozen=True)
class Batch:
    """One fixed stage-2 batch: standardised inputs ``x [B, 4H]``, the prompts' cache, the target replies and
    which rows are harmful."""

    x: torch.Tensor
    prefix: ct.Prefix
    replies: tuple[tuple[int, ...], ...]
    harmful: torch.Tensor  # [B] bool


def train_weights(net: Net, model: Any, batches: Sequence[Batch], *, alpha: float, direction: torch.Tensor,
                  scales: torch.Tensor, top: int, epochs: int, lr: float, reg: float, seed: int,
                  log: Log) -> list[dict[str, float]]:
    """Stage 2: the ``w`` head through the patched forward (``alpha`` the training strength, ``top`` the last
    read layer); returns per-epoch figures (mean harmful and harmless NLL, mean ``w`` per group)."""
    head = nn.Linear(net.fc2.in_features, net.fc2.out_features - 1)
    with torch.no_grad():
        head.weight.copy_(net.fc2.weight[1:])
        head.bias.copy_(net.fc2.bias[1:])
    opt = torch.optim.AdamW(head.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        sums = {"nll_harmful": 0.0, "nll_harmless": 0.0, "w_harmful": 0.0, "w_harmless": 0.0}
        counts = {"harmful": 0, "harmless": 0}
        start = time.monotonic()
        for i in torch.randperm(len(batches), generator=gen).tolist():
            b = batches[i]
            with torch.no_grad():
                z, s = net.trunk(b.x), torch.sigmoid(net(b.x)[:, 0])  # [B, D], [B]: fixed in stage 2
            w = torch.sigmoid(head(z))  # [B, N]
            nll = ct.reply_nll(model, b.prefix, b.replies, s[:, None] * w, alpha, direction, scales, top)  # [B]
            parts = [nll[m].mean() for m in (b.harmful, ~b.harmful) if bool(m.any())]
            loss = torch.stack(parts).sum() + reg * w.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            for key, m in (("harmful", b.harmful), ("harmless", ~b.harmful)):
                sums[f"nll_{key}"] += float(nll[m].detach().sum())
                sums[f"w_{key}"] += float(w[m].detach().mean(dim=1).sum())
                counts[key] += int(m.sum())
        row = {"epoch": float(epoch + 1), "seconds": time.monotonic() - start}
        row.update({k: v / max(counts[k.split("_")[1]], 1) for k, v in sums.items()})
        history.append(row)
        log(f"  weights epoch {epoch + 1}/{epochs} ({row['seconds']:.0f} s): NLL harmful {row['nll_harmful']:.3f}, "
            f"harmless {row['nll_harmless']:.3f}; mean w harmful {row['w_harmful']:.3f}, "
            f"harmless {row['w_harmless']:.3f}")
    with torch.no_grad():
        net.fc2.weight[1:] = head.weight
        net.fc2.bias[1:] = head.bias
    return history


def fold(net: Net, std: Standardiser) -> dict[str, torch.Tensor]:
    """The artifact's ``w1, b1, w2, b2`` for raw inputs: ``w1' = w1 / std`` (rounded to fp16, as stored),
    ``b1' = b1 - w1' mean`` computed from the rounded ``w1'`` (so the rounding does not shift the bias)."""
    with torch.no_grad():
        w1 = (net.fc1.weight / std.std[None, :]).half()
        b1 = net.fc1.bias - w1.float() @ std.mean
        return {"w1": w1, "b1": b1.float().contiguous(), "w2": net.fc2.weight.detach().half(),
                "b2": net.fc2.bias.detach().float().clone()}


def gains(tensors: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s [R], s * w [R, N])`` of raw inputs ``x [R, 4H]`` under the artifact's (stored) weights."""
    out = controller_outputs(x, *(tensors[k].float() for k in ("w1", "b1", "w2", "b2")))
    return out[:, 0], out[:, :1] * out[:, 1:]


def choose_alpha(alphas: Sequence[float], harmful_rate: Callable[[float], float],
                 min_harmful: float) -> tuple[float, str]:
    """In ascending order, the first alpha whose harmful refusal rate reaches ``min_harmful``: the least patch
    that works (harmless refusal and repetition only grow with alpha), so larger ones are not generated. If
    none reaches it, the one with the highest rate (the smaller on ties), and a note saying so."""
    seen: dict[float, float] = {}
    for alpha in sorted(alphas):
        seen[alpha] = harmful_rate(alpha)
        if seen[alpha] >= min_harmful:
            return alpha, f"the smallest alpha tried whose harmful refusal reaches {min_harmful}"
    best = max(seen, key=lambda a: (seen[a], -a))
    return best, f"no alpha tried reached harmful refusal {min_harmful}: chose the highest rate"
