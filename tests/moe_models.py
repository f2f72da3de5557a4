"""Small random-initialised MoE checkpoints for the architectures vLLM's CPU build runs (tests only: the
default model is dense). Each is a transformers ``save_pretrained`` folder with the default model's
tokenizer copied in, loadable by both engines (``steerserve serve --model PATH``).

Sizes: hidden 128 (a multiple of 32, 4 heads of 32: vLLM's CPU attention needs head size >= 32), 3 layers,
8-16 experts, top-2, untied embeddings (vLLM's OLMoE never ties). ``initializer_range=0.2`` widens the
margins between the top logits (about 10x the default's), so both engines' greedy tokens and expert choices
do not hinge on float rounding.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "deepseek_v2")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json")


def config(arch: str) -> Any:
    """The transformers config of the tiny ``arch`` model."""
    from transformers import (
        DeepseekV2Config,
        GraniteMoeConfig,
        MixtralConfig,
        OlmoeConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
    )

    common: dict[str, Any] = dict(vocab_size=49152, hidden_size=128, num_hidden_layers=3, num_attention_heads=4,
                                  num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=2, initializer_range=0.2)
    if arch == "mixtral":
        return MixtralConfig(**common, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2, head_dim=32)
    if arch == "qwen2_moe":  # layer 0 dense: requests naming it get a 400
        return Qwen2MoeConfig(**common, intermediate_size=128, moe_intermediate_size=64,
                              shared_expert_intermediate_size=64, num_experts=16, num_experts_per_tok=2,
                              norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[0])
    if arch == "qwen3_moe":
        return Qwen3MoeConfig(**common, intermediate_size=128, moe_intermediate_size=64, num_experts=8,
                              num_experts_per_tok=2, norm_topk_prob=True, head_dim=32, decoder_sparse_step=1,
                              mlp_only_layers=[])
    if arch == "olmoe":
        return OlmoeConfig(**common, intermediate_size=64, num_experts=16, num_experts_per_tok=2, norm_topk_prob=False)
    if arch == "granitemoe":  # one tensor out of each vLLM block; the router returns (ids, weights, logits)
        return GraniteMoeConfig(**common, intermediate_size=64, num_local_experts=8, num_experts_per_tok=2)
    # layer 0 dense (first_k_dense_replace), one shared expert; MLA with the latent width vLLM's CPU kernel takes
    # (kv_lora_rank 512 + rope 64 = 576)
    if arch == "deepseek_v2":
        return DeepseekV2Config(**{**common, "num_key_value_heads": 4}, intermediate_size=128,
                                moe_intermediate_size=64, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                                first_k_dense_replace=1, moe_layer_freq=1, topk_method="greedy", n_group=1,
                                topk_group=1, routed_scaling_factor=1.0, norm_topk_prob=False, kv_lora_rank=512,
                                q_lora_rank=None, qk_rope_head_dim=64, qk_nope_head_dim=64, v_head_dim=64)
    raise ValueError(f"unknown MoE architecture {arch!r}; one of {ARCHS}")


def build(arch: str, folder: Path, tokenizer_from: Path, seed: int = 0, **overrides: Any) -> Path:
    """Write the tiny ``arch`` checkpoint (fp32) into ``folder`` (created) and return it; ``overrides`` change
    config fields (e.g. a larger model for a benchmark)."""
    cfg = config(arch)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return save(cfg, folder, tokenizer_from, seed)


def save(cfg: Any, folder: Path, tokenizer_from: Path, seed: int = 0) -> Path:
    """A random-initialised (``seed``) fp32 model of ``cfg`` saved into ``folder`` with the tokenizer of
    ``tokenizer_from`` copied beside it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, folder / name)
    return folder
