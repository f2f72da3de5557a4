"""``refusal_controller``: a trained controller decides, per request and on the device, how much refusal to add.

``{"method": "refusal_controller", "controller": NAME, "alpha": a}`` (Guiding Giants, Hegazy et al.
2505.20309, the paper's version; ``runtime.controller``). The controller (a ``controller`` artifact, made by
``steerserve train controller``) reads the request's last prompt token at four layers ``k-3..k`` inside the
prefill's forward pass and writes ``s * w_l`` into the request's registers; the same token's layers above
``k`` and every generated token then get ``h_l += alpha * s * w_l * scale_l * r`` at every layer ``l``
(``runtime.controller`` says why it reads below the top). The host decides nothing: a harmful prompt gets
``s`` near 1 (a refusal), a harmless one near 0 (untouched, up to ``alpha * s``).

``alpha`` (default: the artifact's, chosen on held-out training prompts) is in units of each layer's mean
residual norm. The response reports ``controller_scale`` (``s``) with the last output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from steerserve.methods.base import Compiled, check_keys, coeff, string
from steerserve.runtime.controller import ControllerWeights
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.spec import PromptInfo, ResolveContext


class RefusalController:
    name = "refusal_controller"

    async def compile(
        self, params: Mapping[str, Any], prompt: PromptInfo, ctx: ResolveContext, where: str
    ) -> Compiled:
        check_keys(params, ("controller", "alpha"), where)
        stored = ctx.store.load_controller(string(params, "controller", where), field=f"{where}.controller")
        alpha = coeff(params, ctx, where, key="alpha", default=stored.alpha)
        weights = stored.weights
        ops = controller_ops(weights, alpha, len(prompt.token_ids))
        detail = {"alpha": alpha, "read_layers": list(weights.read_layers), "layers": weights.num_layers}
        return Compiled(ops, (stored.meta.ref(),), detail, controller=weights)


def controller_ops(weights: ControllerWeights, alpha: float, prompt_len: int) -> tuple[SteerOp, ...]:
    """The gain ops a controlled request runs: ``alpha * scale_l * r`` at every layer ``l`` from its last
    prompt token on (the layers above the decision's take it), each times the gain its controller writes."""
    direction = VectorRef.of(weights.direction)  # one bank row, read at every layer
    return tuple(SteerOp(OpKind.ADD, layer, direction, alpha * float(weights.scales[layer]), prompt_len - 1, None,
                         gain=True) for layer in range(weights.num_layers))
