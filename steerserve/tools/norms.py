"""The model's typical residual-stream norm per layer: the yardstick for vetting uploaded vectors.

Measured once per model on a fixed set of neutral sentences (the unsteered model, no chat template): the
median over all tokens but the first of ``||h_l[t]||`` at each layer's output. The first token is left
out because it carries the "attention sink" outlier, tens of times the norm of every other token, which
would make the yardstick useless. The result is recorded as JSON next to the model's artifact store, so
later starts read it instead of running the model.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

# Plain sentences of ordinary text: what "typical" activations are measured on.
PROMPTS = (
    "The weather was mild this morning, so we walked to the market and bought some bread.",
    "Please summarise the main points of the report in three short paragraphs.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She opened the window, listened to the rain for a while, and went back to her book.",
    "How many days are there in a leap year, and why do we need them?",
    "The committee will meet again next Tuesday to discuss the budget for the new library.",
    "Write a short poem about a cat sleeping in the sun.",
    "In 1969, astronauts landed on the Moon and returned safely to Earth.",
)
FILE = "activation_norms.json"

HiddenStates = Callable[[Sequence[Sequence[int]], Sequence[int]], Sequence[torch.Tensor]]


def measure(hidden_states: HiddenStates, tokenize: Callable[[str], list[int]], num_layers: int) -> list[float]:
    """Median per-layer norm (layer ``l`` = output of decoder block ``l``) over ``PROMPTS``' tokens 1.."""
    layers = list(range(num_layers))
    states = hidden_states([tokenize(p) for p in PROMPTS], layers)  # each [len, L, H]
    norms = torch.cat([s[1:].norm(dim=-1) for s in states])  # [tokens, L]
    return [float(x) for x in norms.median(dim=0).values]


def measure_hf(model: torch.nn.Module, tokenize: Callable[[str], list[int]], num_layers: int) -> list[float]:
    """``measure`` on a transformers causal LM, run unsteered."""
    from steerserve.runtime.hooks import capture_hidden_states

    return measure(lambda p, layers: capture_hidden_states(model, p, layers), tokenize, num_layers)


def load_or_measure(folder: Path, fingerprint: str, measure_fn: Callable[[], list[float]]) -> list[float]:
    """The recorded norms in ``folder`` for this model, measuring (and recording) them the first time."""
    path = folder / FILE
    try:
        record = json.loads(path.read_text())
        if record.get("model_fingerprint") == fingerprint:
            return [float(x) for x in record["median_norm"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    norms = measure_fn()
    record = {"model_fingerprint": fingerprint, "statistic": "median ||h_l[t]|| over tokens 1.. of the prompts",
              "prompts": len(PROMPTS), "median_norm": norms}
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".tmp-{uuid.uuid4().hex}.json"
    tmp.write_text(json.dumps(record, indent=1))
    os.replace(tmp, path)  # atomic: a reader sees the old record or the whole new one
    return norms
