"""What the rest of the server needs to know about the loaded model, without importing it."""

from __future__ import annotations

from dataclasses import dataclass

# Layer l is the residual stream at the output of decoder block l (0-based), i.e. transformers'
# ``output_hidden_states[l + 1]``. Recorded in every artifact's metadata.
LAYER_CONVENTION = "output of decoder block l (0-based) = transformers hidden_states[l+1]"


@dataclass(frozen=True)
class MoEInfo:
    """A model's MoE layout (``runtime.route_op`` masks its routers): which decoder layers route tokens to
    experts, over how many experts, top-k, and whether the top-k weights are renormalised to sum 1."""

    layers: tuple[int, ...]
    num_experts: int
    top_k: int
    renormalize: bool  # Mixtral always; Qwen2/3-MoE per norm_topk_prob; OLMoE never (as vLLM runs them)
    unmaskable: str = ""  # why expert masks are refused on this router ('' = they are served)


@dataclass(frozen=True)
class ModelInfo:
    name: str  # served name (/v1/models)
    architecture: str  # e.g. LlamaForCausalLM
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_model_len: int
    dtype: str
    fingerprint: str  # sha256 over architecture, shapes and a sample of the weights
    moe: MoEInfo | None = None  # None: a dense model (no router to mask)
