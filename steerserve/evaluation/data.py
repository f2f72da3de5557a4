"""Evaluation prompts, read at run time: ``.txt`` (one prompt per line), ``.json`` (a list of strings or
of objects) or ``.jsonl`` (one object per line). Objects give the prompt under ``field`` and, optionally,
a reference answer under ``reference_field`` (GSM8K's ``answer``). The repository ships no dataset copies.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from steerserve.errors import SteerError


@dataclass(frozen=True)
class Sample:
    index: int  # position in the file (after nothing is skipped): stable ids across runs
    prompt: str
    reference: str | None = None
    draw: int = 0  # which of the prompt's replies (--samples K): sampled with seed ``--seed + draw``


def with_draws(samples: list[Sample], k: int) -> list[Sample]:
    """Each sample ``k`` times, as draws ``0 .. k-1`` (one reply each), a prompt's draws side by side."""
    if k < 1:
        raise SteerError("must be >= 1", field="--samples")
    return [replace(s, draw=d) for s in samples for d in range(k)]


def read_items(path: Path) -> list[Any]:
    """The raw items of a prompt file: strings (``.txt``) or parsed JSON values."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [line for line in text.splitlines() if line.strip()]
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    items = json.loads(text)
    if not isinstance(items, list):
        raise SteerError("a .json prompt file must hold a list", field=str(path))
    return items


def read_samples(path: Path, field: str, limit: int | None = None, offset: int = 0,
                 reference_field: str | None = None) -> list[Sample]:
    """Items ``offset .. offset + limit`` of ``path`` as samples (``offset`` holds prompts out, e.g. the
    ones a vector was extracted from). Raises SteerError naming the flag or the item that is wrong."""
    if offset < 0:
        raise SteerError("must be >= 0", field="--offset")
    if limit is not None and limit < 1:
        raise SteerError("must be >= 1", field="--limit")
    if not path.is_file():
        raise SteerError(f"no such file {path}", field="--data")
    items = read_items(path)
    chosen = items[offset:] if limit is None else items[offset : offset + limit]
    out = []
    for i, item in enumerate(chosen, start=offset):
        if isinstance(item, str):
            prompt, ref = item, None
        elif isinstance(item, Mapping):
            if field not in item:
                raise SteerError(f"item {i} has no field {field!r} (it has {sorted(item)})", field="--field")
            prompt = str(item[field])
            ref = None if reference_field is None or reference_field not in item else str(item[reference_field])
        else:
            raise SteerError(f"item {i} is neither a string nor an object", field="--data")
        if prompt.strip():
            out.append(Sample(i, prompt, ref))
    if not out:
        raise SteerError(f"no prompts in {path} after --offset {offset}", field="--data")
    return out
