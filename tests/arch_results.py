"""The per-architecture outcomes that ``scripts/arch_table.py`` turns into the README's supported-architectures
table: tests record each check they ran (``record``), pass or fail, into one JSON file."""

from __future__ import annotations

import json
import os
from pathlib import Path

RESULTS = Path(os.environ.get("STEERSERVE_ARCH_RESULTS", Path(__file__).parent / "artifacts" / "architectures.json"))


def record(architecture: str, check: str, ok: bool) -> None:
    """Add one outcome for ``architecture`` (a ``config.architectures`` name) to the results file."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    data.setdefault(architecture, {})[check] = ok
    RESULTS.write_text(json.dumps(data, indent=1, sort_keys=True))
