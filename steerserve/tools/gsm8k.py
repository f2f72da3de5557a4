"""GSM8K rows for the offline tools (``extract asc``, ``calibrate``): reading rows and concise solutions.

The data is read at run time from ``../shared/data/gsm8k/train.jsonl`` (relative to the repository root)
or a path given on the command line; nothing of it is copied into the repository. Rows are addressed by
their 0-based line number, so that every tool can record exactly which rows it used and keep the
extraction, calibration and evaluation ranges disjoint.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

_REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = _REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"

_CALC = re.compile(r"<<([^<>]*)>>")  # GSM8K's calculator annotations: "<<48/2=24>>"


class DataMissing(RuntimeError):
    """The GSM8K file is not there (a user's machine has no ``../shared``)."""


@dataclass(frozen=True)
class Problem:
    row: int  # 0-based line number in the file
    question: str
    answer: str  # the worked solution, annotations included, ending in "#### N"

    @property
    def gold(self) -> str:
        """The final answer after ``####``, commas removed."""
        return self.answer.rsplit("####", 1)[-1].strip().replace(",", "")


def shown(path: Path) -> str:
    """``path`` as provenance records it: the default as ``../shared/...`` (relative to the repository root,
    so the record means the same on every checkout), any other path as given."""
    return "../" + str(DEFAULT_DATA.relative_to(_REPO.parent)) if path.absolute() == DEFAULT_DATA else str(path)


def read_rows(path: Path, offset: int, count: int) -> list[Problem]:
    """Rows ``[offset, offset + count)`` of a GSM8K jsonl file; fewer if the file ends first."""
    if not path.is_file():
        raise DataMissing(f"GSM8K data not found at {path} (pass --data PATH to a train.jsonl)")
    out = []
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i >= offset + count:
                break
            if i >= offset:
                item = json.loads(line)
                out.append(Problem(i, str(item["question"]), str(item["answer"])))
    return out


def calculations(answer: str) -> str:
    """The concise solution: the calculator annotations, one per line, then ``#### N``."""
    steps = [c.replace(" ", "") for c in _CALC.findall(answer)]
    return "\n".join([*steps, "#### " + answer.rsplit("####", 1)[-1].strip()])


def worked(answer: str) -> str:
    """The dataset's own short worked solution, annotations removed (it still ends in ``#### N``)."""
    return _CALC.sub("", answer).strip()


CONCISE = {"calc": calculations, "worked": worked}
# The "be concise" instruction: the prompt baseline of the evaluation, and what ``extract asc --concise
# model`` asks the model for to get its own concise answers.
CONCISE_INSTRUCTION = "Be concise: give only the short calculation and the final answer."
