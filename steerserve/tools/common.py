"""Helpers every offline tool shares: flag checks, prompt files, atomic artifact files. Below every tool's
module (no tool imports another's command registry for them)."""

from __future__ import annotations

import argparse
import os
import uuid
from collections.abc import Mapping
from pathlib import Path

import safetensors.torch
import torch

from steerserve.evaluation.data import read_items


def require_counts(args: argparse.Namespace, keys: tuple[str, ...]) -> None:
    """Exit with a message naming the flag when any of ``args.<key>`` is below 1."""
    for key in keys:
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')} must be at least 1")


def read_prompts(path: Path, field: str, limit: int | None) -> list[str]:
    prompts = [item if isinstance(item, str) else str(item[field]) for item in read_items(path)]
    return prompts[:limit] if limit else prompts


def write_artifact(path: Path, vectors: Mapping[int, torch.Tensor], header: dict[str, str]) -> None:
    """``vectors`` (layer -> ``[hidden]``) as a safetensors artifact file with ``header`` as its metadata."""
    data = safetensors.torch.save({f"layer.{k}": v.contiguous() for k, v in vectors.items()}, metadata=header)
    write_bytes(path, data)


def write_bytes(path: Path, data: bytes) -> None:
    """``data`` to ``path`` atomically: a crash never leaves a half file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
