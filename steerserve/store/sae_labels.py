"""Searching a ``sae`` dictionary's features by label (``GET /features/search``, the playground's picker).

The labels live in the file's safetensors header (``sae_labels``, JSON ``{"<feature>": label}``, see
``store.sae``): ``read_labels`` reads the header alone, never a tensor, so that searching a dictionary of a
million features costs its header, not its weights. ``LabelIndex`` holds them prepared for search; the
service keeps one per artifact version.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import safetensors

from steerserve.errors import SteerError
from steerserve.store.sae import SaeFile, check_labels

MAX_QUERY_CHARS = 200
MAX_MATCHES = 100


def read_labels(file: SaeFile) -> dict[int, str]:
    """``file``'s labels (feature -> label; empty without any), from its header alone."""
    with safetensors.safe_open(str(file.path), framework="pt") as f:
        raw = (f.metadata() or {}).get("sae_labels")
    return check_labels(raw, file.d_sae)


def _norm(text: str) -> str:
    """Case-folded, runs of whitespace as one space."""
    return " ".join(text.casefold().split())


@dataclass(frozen=True)
class LabelIndex:
    """A dictionary's labels prepared for ``search``: (feature, label, normalised label), by feature."""

    entries: tuple[tuple[int, str, str], ...]

    @classmethod
    def of(cls, labels: Mapping[int, str]) -> LabelIndex:
        return cls(tuple((i, label, _norm(label)) for i, label in sorted(labels.items())))

    def __len__(self) -> int:
        return len(self.entries)

    def search(self, query: str, limit: int) -> tuple[list[tuple[int, str]], int]:
        """The features whose label contains ``query`` (case-insensitive, runs of whitespace as one space),
        best first: the query as a whole word (or words) of the label, then as the start of a word, then
        anywhere; within each, labels that hold the query as a whole word more often first, then shorter
        labels (so a label equal to the query leads), then lower feature indices. Returns at most ``limit`` of
        them and how many matched in all. A blank or overlong query, or a limit outside [1, ``MAX_MATCHES``],
        is a 400 naming ``q`` or ``limit``."""
        q = _norm(query)
        if not q:
            raise SteerError("must contain a non-space character", field="q")
        if len(query) > MAX_QUERY_CHARS:
            raise SteerError(f"must be at most {MAX_QUERY_CHARS} characters", field="q")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_MATCHES:
            raise SteerError(f"must be an integer in [1, {MAX_MATCHES}]", field="limit")
        word = re.compile(rf"(?<!\w){re.escape(q)}(?!\w)")
        start = re.compile(rf"(?<!\w){re.escape(q)}")
        found = []
        for i, label, text in self.entries:
            if q not in text:  # the cheap test first: most labels miss
                continue
            whole = len(word.findall(text))
            tier = 0 if whole else 1 if start.search(text) else 2
            # More whole-word hits first: "food: food, diet, feast" names food twice (its topic and its own
            # top token), "food: '  ', _" once (a topic prefix over junk tokens).
            found.append((tier, -whole, len(text), i, label))
        found.sort()
        return [(i, label) for *_, i, label in found[:limit]], len(found)
