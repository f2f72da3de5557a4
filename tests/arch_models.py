"""Tiny random-initialised dense checkpoints, one per architecture family of ``steerserve.anatomy`` (tests
and the architecture table only: the default model is the one Llama we ship).

Each is built from its transformers config class (nothing downloaded), 2 decoder layers, hidden 128 in
heads of 32 (vLLM's CPU attention needs head size >= 32), the default model's tokenizer and vocabulary
copied in. ``initializer_range=0.2`` (about 10x the usual) widens the margins between the top logits, so
both engines' greedy tokens do not hinge on float rounding. Sliding windows are set longer than any test
sequence: the hf engine's batched cache holds whole sequences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.moe_models import save

VOCAB, HIDDEN, LAYERS, HEADS = 49152, 128, 2, 4
# family -> (config class name, its own field names for the common sizes, extra fields)
_LLAMA = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": 2,
          "intermediate_size": 256, "max_position_embeddings": 2048}
_WINDOW = {"sliding_window": 4096}
# No logit soft-capping: with these wide random weights every logit would sit at the cap, all tied.
_GEMMA = {**_WINDOW, "head_dim": 32, "query_pre_attn_scalar": 32, "final_logit_softcapping": None,
          "attn_logit_softcapping": None}
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", _LLAMA),
    "mistral": ("MistralConfig", {**_LLAMA, "sliding_window": None}),
    "qwen2": ("Qwen2Config", _LLAMA),
    "qwen3": ("Qwen3Config", {**_LLAMA, "head_dim": 32}),
    "gemma": ("GemmaConfig", {**_LLAMA, "head_dim": 32}),
    "gemma2": ("Gemma2Config", {**_LLAMA, **_GEMMA}),
    "gemma3": ("Gemma3TextConfig", {**_LLAMA, **_GEMMA, "architectures": ["Gemma3ForCausalLM"]}),
    "phi3": ("Phi3Config", {**_LLAMA, "sliding_window": None}),
    "stablelm": ("StableLmConfig", _LLAMA),
    "granite": ("GraniteConfig", _LLAMA),
    "cohere": ("CohereConfig", _LLAMA),
    "cohere2": ("Cohere2Config", {**_LLAMA, **_WINDOW}),
    "olmo2": ("Olmo2Config", _LLAMA),
    "starcoder2": ("Starcoder2Config", {**_LLAMA, "sliding_window": None}),
    "gpt_neox": ("GPTNeoXConfig", {k: v for k, v in _LLAMA.items() if k != "num_key_value_heads"}),
    "gpt2": ("GPT2Config", {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_positions": 2048}),
    "falcon": ("FalconConfig", {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS}),
    "bloom": ("BloomConfig", {"hidden_size": HIDDEN, "n_layer": LAYERS, "n_head": HEADS}),
    "gptj": ("GPTJConfig", {"n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "rotary_dim": 16,
                            "n_positions": 2048}),
    "opt": ("OPTConfig", {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
                          "ffn_dim": 256, "word_embed_proj_dim": HIDDEN, "max_position_embeddings": 2048}),
}
ARCHS = tuple(CONFIGS)


def config(arch: str, **overrides: Any) -> Any:
    """The transformers config of the tiny ``arch`` model; ``overrides`` change fields (e.g. more layers)."""
    import transformers

    cls_name, fields = CONFIGS[arch]
    return getattr(transformers, cls_name)(**{"vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2,
                                              "pad_token_id": 2, "initializer_range": 0.2, **fields, **overrides})


def build(arch: str, folder: Path, tokenizer_from: Path, seed: int = 0, **overrides: Any) -> Path:
    """Write the tiny ``arch`` checkpoint (fp32) into ``folder`` and return it; ``overrides`` change config
    fields (e.g. more layers)."""
    return save(config(arch, **overrides), folder, tokenizer_from, seed)
