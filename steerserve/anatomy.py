"""Where each supported architecture keeps its parts, on the transformers model and on vLLM's.

Everything that needs a model's decoder layers, final norm, body (the stack without the head), input
embeddings, LM head or MoE routers asks here; nothing else spells ``model.model.layers``. An architecture
missing from ``FAMILIES`` is refused when the model is opened (``anatomy_of``), with the supported list.

Layer ``L`` means the residual stream after decoder block ``L`` on both engines (``model_info.LAYER_CONVENTION``),
whatever the block returns. vLLM's blocks return it in one of three shapes (``Anatomy.vllm_output``):
- ``"sum"``: ``(hidden, residual)`` whose SUM is the stream (the add is fused into the next RMSNorm:
  Llama, Mistral, Qwen, Gemma, the MoE families);
- ``"first"``: ``(hidden, residual)`` where ``hidden`` already is the stream and ``residual`` is an
  intermediate the next block ignores (Cohere's parallel block, StableLM's un-fused pre-norm block);
- ``"single"``: one tensor, the stream (GPT-2, Falcon, Granite, OPT, Bloom, GPT-J, and every model vLLM runs
  through its transformers backend: GPT-NeoX, OLMo2, Starcoder2).
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Literal

from torch import nn

Output = Literal["sum", "first", "single"]


class UnsupportedArchitecture(RuntimeError):
    """The model's architecture is not in ``FAMILIES``: raised when the model is opened, before any request."""


@dataclass(frozen=True)
class Anatomy:
    """One architecture family. Paths are dotted attributes from the causal-LM object (transformers'
    ``...ForCausalLM`` or vLLM's model class)."""

    family: str
    architectures: tuple[str, ...]  # config.architectures[0] values (= transformers' class names)
    layers: str = "model.layers"  # transformers: the decoder blocks (an nn.ModuleList)
    norm: str = "model.norm"  # transformers: the final norm, whose output the head reads
    vllm_layers: str = "model.layers"  # vLLM: the decoder blocks (PP placeholders where another rank has them)
    vllm_output: Output = "sum"  # what a vLLM block returns (module docstring)
    # MoE families only: the config key of the expert count (empty: a dense family), whether vLLM renormalises
    # the top-k weights (None: per the config's ``norm_topk_prob``), the transformers router inside a block.
    experts: str = ""
    renormalize: bool | None = None
    router: str = "mlp.gate"
    router_out: tuple[str, str, str] = ("logits", "weights", "ids")  # what the transformers router returns

    @property
    def moe(self) -> bool:
        return bool(self.experts)


def _llama_like(family: str, *archs: str, output: Output = "sum", norm: str = "model.norm") -> Anatomy:
    return Anatomy(family, archs, norm=norm, vllm_output=output)


def _gpt2_like(family: str, *archs: str) -> Anatomy:
    return Anatomy(family, archs, layers="transformer.h", norm="transformer.ln_f", vllm_layers="transformer.h",
                   vllm_output="single")


FAMILIES: tuple[Anatomy, ...] = (
    _llama_like("llama", "LlamaForCausalLM"),
    _llama_like("mistral", "MistralForCausalLM"),
    _llama_like("qwen2", "Qwen2ForCausalLM"),
    _llama_like("qwen3", "Qwen3ForCausalLM"),
    _llama_like("gemma", "GemmaForCausalLM"),
    _llama_like("gemma2", "Gemma2ForCausalLM"),
    _llama_like("gemma3", "Gemma3ForCausalLM"),
    _llama_like("phi3", "Phi3ForCausalLM"),
    _llama_like("stablelm", "StableLmForCausalLM", output="first"),
    _llama_like("granite", "GraniteForCausalLM", output="single"),
    _llama_like("cohere", "CohereForCausalLM", "Cohere2ForCausalLM", output="first"),
    _llama_like("olmo2", "Olmo2ForCausalLM", output="single"),  # vLLM: transformers backend
    _llama_like("starcoder2", "Starcoder2ForCausalLM", output="single"),  # vLLM: transformers backend
    Anatomy("gpt_neox", ("GPTNeoXForCausalLM",), layers="gpt_neox.layers", norm="gpt_neox.final_layer_norm",
            vllm_layers="model.layers", vllm_output="single"),  # vLLM: transformers backend (model = GPTNeoXModel)
    _gpt2_like("gpt2", "GPT2LMHeadModel"),
    _gpt2_like("falcon", "FalconForCausalLM"),
    _gpt2_like("bloom", "BloomForCausalLM"),
    _gpt2_like("gptj", "GPTJForCausalLM"),
    Anatomy("opt", ("OPTForCausalLM",), layers="model.decoder.layers", norm="model.decoder.final_layer_norm",
            vllm_layers="model.decoder.layers", vllm_output="single"),
    Anatomy("mixtral", ("MixtralForCausalLM",), experts="num_local_experts", renormalize=True),
    Anatomy("qwen2_moe", ("Qwen2MoeForCausalLM",), experts="num_experts"),
    Anatomy("qwen3_moe", ("Qwen3MoeForCausalLM",), experts="num_experts"),
    Anatomy("olmoe", ("OlmoeForCausalLM",), experts="num_experts", renormalize=False),
    Anatomy("deepseek_v2", ("DeepseekV2ForCausalLM",), experts="n_routed_experts"),  # shared experts, MLA
    Anatomy("granitemoe", ("GraniteMoeForCausalLM",), vllm_output="single", experts="num_local_experts",
            renormalize=True, router="block_sparse_moe.router", router_out=("ids", "weights", "logits")),
)
# The input embedding's weight as the families name it in their checkpoints (the fingerprint samples it).
EMBEDDING_WEIGHTS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
_BY_ARCH = {arch: a for a in FAMILIES for arch in a.architectures}


def supported() -> list[str]:
    """Every architecture name served, sorted."""
    return sorted(_BY_ARCH)


def anatomy_of(architecture: str) -> Anatomy:
    """The family of ``architecture`` (a ``config.architectures`` entry); refuses an unknown one in one line."""
    found = _BY_ARCH.get(architecture)
    if found is None:
        raise UnsupportedArchitecture(f"architecture {architecture!r} is not supported by steerserve; supported: "
                                      f"{', '.join(supported())}")
    return found


def _of(model: nn.Module) -> Anatomy:
    return anatomy_of(type(model).__name__)


def hf_layers(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks of a transformers causal LM; block ``i`` is steering layer ``i``."""
    layers = attrgetter(_of(model).layers)(model)
    assert isinstance(layers, nn.ModuleList)
    return list(layers)


def hf_norm(model: nn.Module) -> nn.Module:
    """The final norm of a transformers causal LM (its output is what the LM head reads)."""
    norm: nn.Module = attrgetter(_of(model).norm)(model)
    return norm


def hf_body(model: nn.Module) -> Any:
    """The stack without the head (transformers' ``base_model``): its ``last_hidden_state`` is final-normed."""
    return model.base_model


def hf_embeddings(model: Any) -> nn.Module:
    """The input token embeddings."""
    emb: nn.Module = model.get_input_embeddings()
    return emb


def hf_head(model: Any) -> Any:
    """The LM head, a ``Linear(H, V)`` (``.weight [V, H]``; on a tied model the embeddings' weight)."""
    return model.get_output_embeddings()


def hf_router(model: nn.Module, layer: int) -> nn.Module:
    """The top-k router of MoE block ``layer``; it returns ``logits [T, E]``, ``weights [T, k]`` and ``ids [T, k]``
    in the family's ``router_out`` order."""
    a = _of(model)
    if not a.moe:
        raise TypeError(f"{a.family} is not a mixture-of-experts family")
    router: nn.Module = attrgetter(a.router)(hf_layers(model)[layer])
    if not hasattr(router, "top_k"):
        raise TypeError(f"{type(router).__name__} at layer {layer}.{a.router} is not a top-k router")
    return router


def vllm_layers(model: nn.Module, architecture: str) -> nn.ModuleList:
    """The decoder blocks of vLLM's model of ``architecture`` (PP placeholders included)."""
    path = anatomy_of(architecture).vllm_layers
    try:
        layers = attrgetter(path)(model)
    except AttributeError as exc:
        raise TypeError(f"cannot find decoder layers at {type(model).__name__}.{path}") from exc
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__}.{path} is not a module list")
    return layers
