"""A user's own checkpoint, end to end: two non-Llama architectures (GPT-2: blocks at ``transformer.h``, one
tensor out of each vLLM block; Qwen3: ``model.layers``, a ``(hidden, residual)`` pair), random weights (so the
pipeline is what is tested, not the effects), 6 layers so that every tool's layer choices exist.

For each: the offline tools run on the folder (``extract mean-diff``, ``extract refusal-direction``,
``calibrate``, ``train controller``, ``train safeswitch``), then ``serve --model DIR`` (GPT-2 on the vllm
engine, Qwen3 on hf; both engines steer both in ``test_architectures``) takes their artifacts over the admin
API, steers with them over HTTP, and refuses the other model's artifact naming both fingerprints.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from steerserve.cli import main
from steerserve.config import Settings
from steerserve.model import model_info, prepare_default_model
from steerserve.service import build_service
from tests import arch_models
from tests.conftest import ADMIN_KEY, serving
from tests.paths import models_dir

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ARCHS = {"gpt2": ("vllm", {"n_layer": 6}), "qwen3": ("hf", {"num_hidden_layers": 6})}
HEADERS = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root, tokenizer = tmp_path_factory.mktemp("own-models"), prepare_default_model(models_dir())
    return {arch: arch_models.build(arch, root / arch, tokenizer, **sizes) for arch, (_, sizes) in ARCHS.items()}


def _tool(*argv: str | Path) -> None:
    """One ``steerserve`` command, in process; fails the test on a non-zero exit."""
    with pytest.raises(SystemExit) as done:
        main([str(a) for a in argv])
    assert done.value.code in (0, None), argv


def _artifacts(model: Path, out: Path) -> dict[str, Path]:
    """Every tool that takes ``--model`` run on ``model``, small; their files by artifact name."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "pos.txt").write_text("I love this, it is wonderful\nWhat a great and happy day\nThis is fantastic news\n")
    (out / "neg.txt").write_text("I hate this, it is awful\nWhat a terrible and sad day\nThis is dreadful news\n")
    files = {name: out / f"{name}.safetensors" for name in ("vec", "dir", "cal", "ctl", "probes", "head")}
    _tool("extract", "mean-diff", "--model", model, "--positive", out / "pos.txt", "--negative", out / "neg.txt",
          "--out", files["vec"])
    _tool("extract", "refusal-direction", "--model", model, "--recipe", "prompt", "--train", "8", "--select", "4",
          "--out", files["dir"])
    _tool("calibrate", "--model", model, "--vector", files["vec"], "--layer", "3", "--states", "8", "--out",
          files["cal"])
    _tool("train", "controller", "--model", model, "--direction", files["dir"], "--read-top", "last", "--fit", "16",
          "--select", "8", "--val-harmless", "8", "--epochs", "2", "--e2e-prompts", "8", "--e2e-epochs", "1",
          "--gen-tokens", "8", "--out", files["ctl"])
    _tool("train", "safeswitch", "--model", model, "--fit", "16", "--fit-harmless", "16", "--head-rows", "8",
          "--hold", "4", "--val-harmless", "8", "--judge-tokens", "8", "--probe-epochs", "2", "--head-epochs", "2",
          "--eval-tokens", "8", "--eval-harmless", "8", "--probes-out", files["probes"], "--head-out", files["head"])
    return files


@contextlib.contextmanager
def _server(model: Path, engine: str, home: Path) -> Iterator[httpx.Client]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    settings = Settings(engine=engine, home=home, model=model, admin_key=ADMIN_KEY, max_batch=4, max_tokens_cap=64,
                        vectors_dir=None, engine_args={"enforce_eager": True, "max_model_len": 512}
                        if engine == "vllm" else {})
    from steerserve.api import create_app

    with serving(create_app(build_service(settings, log=lambda _m: None), settings)) as url, \
            httpx.Client(base_url=url, timeout=120) as client:
        yield client


def _upload(client: httpx.Client, name: str, path: Path) -> httpx.Response:
    return client.post("/admin/vectors", headers=HEADERS, data={"name": name},
                       files={"file": (path.name, path.read_bytes(), "application/octet-stream")})


def _generate(client: httpx.Client, *interventions: dict[str, Any]) -> str:
    body: dict[str, Any] = {"prompt": "The weather today is", "max_tokens": 12, "temperature": 0}
    if interventions:
        body["steering"] = {"interventions": list(interventions)}
    r = client.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return str(r.json()["text"])


@pytest.mark.parametrize("arch", list(ARCHS))
def test_own_checkpoint_tools_then_serve_and_steer(arch: str, folders: dict[str, Path], tmp_path: Path) -> None:
    if not (DATA / "refusal" / "harmful_train.json").exists() or not (DATA / "gsm8k" / "train.jsonl").exists():
        pytest.skip(f"{DATA} is missing (../shared/data): the refusal and GSM8K tools read it")
    engine = ARCHS[arch][0]
    if engine == "vllm":
        pytest.importorskip("vllm")
    model, other = folders[arch], folders[next(a for a in ARCHS if a != arch)]
    files = _artifacts(model, tmp_path / "artifacts")
    foreign = _artifacts(other, tmp_path / "foreign")["vec"] if arch == "gpt2" else None
    with _server(model, engine, tmp_path / "home") as client:
        for name, path in files.items():
            r = _upload(client, name, path)
            assert r.status_code == 201, (name, r.text)
        plain = _generate(client)
        assert _generate(client, {"method": "add", "vector": "vec", "coeff": 0}) == plain  # coefficient 0
        assert _generate(client, {"method": "add", "vector": "vec", "coeff": 8}) != plain
        assert _generate(client, {"method": "ablate", "vector": "dir"}) != plain
        assert _generate(client, {"method": "refusal_controller", "controller": "ctl", "alpha": 4})
        assert _generate(client, {"method": "safeswitch", "probes": "probes", "head": "head"})
        if foreign is not None:  # the other model's artifact: refused, naming both fingerprints
            r = _upload(client, "foreign", foreign)
            mine, theirs = model_info(model).fingerprint, model_info(other).fingerprint
            assert r.status_code == 400 and mine in r.text and theirs in r.text, r.text
