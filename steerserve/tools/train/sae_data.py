"""The corpus and activations ``steerserve train sae`` trains on, built offline (nothing is downloaded).

Three sources, each rendered through the model's chat template (``PromptRenderer``):

- the public Alpaca instructions of ``../shared/data/refusal/harmless_train.json`` (user turns);
- GSM8K's ``train.jsonl`` questions with their worked answers as the assistant's turn (annotations removed);
- the model's **own sampled replies** to varied topic prompts (``TOPICS`` x ``TEMPLATES``): the replies are
  what steering acts on, and the topics (food, weather, countries, animals, colours, sport, music, code,
  maths, science...) make the concrete-concept features a user looks for by label.

``collect`` runs the frozen model up to decoder block ``L`` only (a forward hook stops it there) and keeps
the residual stream after block ``L`` (our layer convention; sparsify's ``layers.L``) at every position
after the template's shared system-prompt prefix, which is the same in every sequence (and holds the
attention-sink first token, whose norm is ~100x a typical token's).
"""

from __future__ import annotations

import contextlib
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from steerserve.anatomy import hf_layers
from steerserve.tools.common import read_prompts
from steerserve.tools.gsm8k import read_rows

TOPICS: dict[str, tuple[str, ...]] = {
    "food": ("pizza", "pasta", "sushi", "chocolate cake", "bread baking", "cheese", "apples and oranges", "coffee",
             "soup recipes", "rice dishes", "vegetables", "breakfast foods"),
    "weather": ("rainy weather", "snow and winter storms", "sunny summer days", "the weather forecast", "hurricanes",
                "fog and wind", "thunderstorms", "heat waves", "clouds and rain"),
    "country": ("France", "Japan", "Brazil", "Egypt", "India", "Canada", "Germany", "Mexico", "Australia", "Italy",
                "China", "Kenya"),
    "animal": ("dogs", "cats", "elephants", "lions", "birds", "horses", "whales", "snakes", "bees", "penguins"),
    "colour": ("the colour red", "the colour blue", "the colour green", "yellow flowers", "purple and pink",
               "black and white photographs"),
    "sport": ("football", "basketball", "tennis", "swimming", "the Olympic Games", "cycling", "baseball",
              "running a marathon", "golf"),
    "music": ("playing the guitar", "the piano", "jazz", "classical music", "rock bands", "singing"),
    "code": ("Python programming", "JavaScript", "SQL databases", "writing a sorting function", "debugging code",
             "HTML and CSS"),
    "maths": ("algebra", "fractions", "geometry", "prime numbers", "percentages", "solving equations"),
    "science": ("physics", "chemistry", "the solar system", "DNA", "electricity", "volcanoes", "the ocean"),
    "other": ("money and saving", "travel by train", "medicine and doctors", "ancient history", "a birthday party",
              "gardening", "cars", "the internet", "friendship", "books and reading"),
}
TEMPLATES = ("Tell me about {}.", "Write a short paragraph about {}.", "What are three interesting facts about {}?",
             "Describe {} to a child.", "Write a short story that involves {}.")
_CALC = re.compile(r"<<[^<>]*>>")


class DataMissing(RuntimeError):
    """A shared data file is not there (a user's machine has no ``../shared``)."""


def topic_prompts() -> list[str]:
    """Every template applied to every topic, template by template: any first ``n`` cover every topic alike."""
    return [t.format(topic) for t in TEMPLATES for topics in TOPICS.values() for topic in topics]


def instructions(path: Path, rows: int) -> list[str]:
    """The first ``rows`` Alpaca instructions of ``path``."""
    if not path.is_file():
        raise DataMissing(f"{path} not found (the Alpaca instructions live in ../shared/data/refusal/)")
    return read_prompts(path, "instruction", rows)


def gsm8k_turns(path: Path, rows: int) -> list[tuple[str, str]]:
    """The first ``rows`` GSM8K problems as (question, worked answer without calculator annotations)."""
    if not path.is_file():
        raise DataMissing(f"{path} not found (GSM8K lives in ../shared/data/gsm8k/)")
    return [(p.question, _CALC.sub("", p.answer)) for p in read_rows(path, 0, rows)]


@torch.no_grad()
def sample_replies(model: Any, tokenizer: Any, prompts: Sequence[str], max_new: int, batch: int, seed: int,
                   temperature: float = 0.8) -> list[str]:
    """The model's sampled replies (``max_new`` tokens at most, top-p 0.95) to ``prompts`` as user turns."""
    torch.manual_seed(seed)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch):
            texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                   tokenize=False) for p in prompts[i : i + batch]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(**enc, max_new_tokens=max_new, do_sample=True, temperature=temperature, top_p=0.95,
                                 pad_token_id=tokenizer.pad_token_id)
            out += [tokenizer.decode(g[enc.input_ids.shape[1]:], skip_special_tokens=True).strip() for g in gen]
    finally:
        tokenizer.padding_side = side
    return out


def shared_prefix(seqs: Sequence[Sequence[int]]) -> int:
    """The number of leading tokens every sequence shares (the template's system prompt)."""
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs):
            return i
    return n


@dataclass(frozen=True)
class Activations:
    """The residual stream at one layer for every kept token, with the tokens and their sequences."""

    x: torch.Tensor  # [N, H] fp32
    tokens: torch.Tensor  # [N] token ids
    seq: torch.Tensor  # [N] which sequence each token comes from (contexts never cross it)


class _Stop(Exception):
    """Raised by the hook after block ``L``: the blocks above it never run."""


@torch.no_grad()
def collect(model: Any, seqs: Sequence[Sequence[int]], layer: int, skip: int, batch_tokens: int,
            log: Callable[[str], None] = print) -> Activations:
    """The residual stream after block ``layer`` at positions ``skip..`` of every sequence."""
    got: list[torch.Tensor] = []

    def hook(_m: Any, _inp: Any, out: Any) -> None:
        got.append(out[0] if isinstance(out, tuple) else out)
        raise _Stop

    handle = hf_layers(model)[layer].register_forward_hook(hook)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    xs, toks, owner = [], [], []
    try:
        start, done = 0, 0
        while start < len(order):
            end = start + 1
            while end < len(order) and (end - start + 1) * len(seqs[order[end]]) <= batch_tokens:
                end += 1
            idx = order[start:end]
            width = max(len(seqs[i]) for i in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros(len(idx), width, dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[r, : len(seqs[i])] = 1
            with contextlib.suppress(_Stop):
                model(input_ids=ids, attention_mask=mask, use_cache=False)
            h = got.pop().float()
            for r, i in enumerate(idx):
                xs.append(h[r, skip : len(seqs[i])].clone())
                toks.append(ids[r, skip : len(seqs[i])])
                owner.append(torch.full((len(seqs[i]) - skip,), i))
            done += len(idx)
            if done * 10 // len(order) != (done - len(idx)) * 10 // len(order):
                log(f"  activations: {done}/{len(order)} sequences")
            start = end
    finally:
        handle.remove()
    return Activations(torch.cat(xs), torch.cat(toks), torch.cat(owner))


def split(acts: Activations, hold: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices of the training and held-out parts, held out by whole sequences (``hold`` of them)."""
    seqs = sorted(set(acts.seq.tolist()))
    random.Random(seed).shuffle(seqs)
    held = torch.tensor(seqs[: max(1, round(hold * len(seqs)))])
    is_held = torch.isin(acts.seq, held)
    return (~is_held).nonzero().squeeze(1), is_held.nonzero().squeeze(1)
