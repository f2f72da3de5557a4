"""``serve --tensor-parallel-size N``: passed to vLLM as ``engine_args["tensor_parallel_size"]``."""

from __future__ import annotations

from typing import Any

import pytest

from steerserve import cli, service
from steerserve.config import Settings


def _settings(monkeypatch: pytest.MonkeyPatch, *argv: str) -> tuple[int, Settings | None]:
    got: list[Settings] = []

    def build(settings: Settings, log: Any) -> Any:  # stop before any model loads
        got.append(settings)
        raise RuntimeError("stop here")

    monkeypatch.setattr(service, "build_service", build)
    args = cli.build_parser().parse_args(["serve", "--no-vectors", *argv])
    rc = args.func(args)
    return rc, got[0] if got else None


def test_tensor_parallel_size_reaches_engine_args(monkeypatch: pytest.MonkeyPatch) -> None:
    rc, settings = _settings(monkeypatch, "--engine-args", '{"max_num_batched_tokens": 64}',
                             "--tensor-parallel-size", "2")
    assert rc == 2 and settings is not None  # (2: the stub's RuntimeError, after the settings were built)
    assert dict(settings.engine_args) == {"max_num_batched_tokens": 64, "tensor_parallel_size": 2}
    _, plain = _settings(monkeypatch)
    assert plain is not None and "tensor_parallel_size" not in plain.engine_args


def test_tensor_parallel_size_below_one_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    rc, settings = _settings(monkeypatch, "--tensor-parallel-size", "0")
    assert rc == 2 and settings is None
    assert "--tensor-parallel-size" in capsys.readouterr().err
