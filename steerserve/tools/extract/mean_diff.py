"""Mean-difference steering vectors from contrastive prompts.

``v_l = mean_i pool(h_l(pos_i)) - mean_j pool(h_l(neg_j))`` where ``pool`` is the mean over the prompt's
tokens (``"mean"``) or its last token (``"last"``, the refusal-direction recipe on chat-templated
instructions: the state that decides how the answer starts). Used by ``POST /admin/vectors/compute``
and by ``steerserve extract mean-diff`` alike.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from steerserve.spec import HiddenStatesFn

Pooling = Literal["mean", "last"]


async def mean_difference(hidden_states: HiddenStatesFn, positive: Sequence[Sequence[int]],
                          negative: Sequence[Sequence[int]], layers: Sequence[int],
                          pooling: Pooling = "mean", batch: int = 16) -> dict[int, torch.Tensor]:
    """``{layer: [hidden]}`` difference of pooled means; prompts are token id lists."""
    means = []
    for prompts in (positive, negative):
        pooled: list[torch.Tensor] = []
        for i in range(0, len(prompts), batch):  # bounded chunks: the engine stays responsive between them
            for states in await hidden_states(prompts[i : i + batch], layers):  # each [len, L, H]
                pooled.append(states.mean(dim=0) if pooling == "mean" else states[-1])
        means.append(torch.stack(pooled).mean(dim=0))  # [L, H]
    diff = means[0] - means[1]
    return {layer: diff[i].clone() for i, layer in enumerate(layers)}
