"""Where tests keep the prepared default model, so that re-runs skip the one-time preparation."""

from __future__ import annotations

import os
from pathlib import Path


def models_dir() -> Path:
    return Path(os.environ.get("STEERSERVE_TEST_MODELS", Path.home() / ".cache" / "steerserve" / "models"))
