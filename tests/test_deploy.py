"""The container deployment, checked without a Docker engine (none runs here or in CI).

- ``hadolint`` lints the Dockerfile and ``check-jsonschema`` validates docker-compose.yml against the
  compose-spec schema it vendors (both from the ``dev`` extra);
- the compose file agrees with deploy/nginx.conf and with the server's settings: the load balancer's
  upstream is the replicas' service, the replicas' store URL names the postgres service's database and user,
  their store folder is on the volume they share;
- the Dockerfile's RUN commands run outside Docker, in a temp folder laid out as the image would be (its
  COPY sources copied to WORKDIR; every absolute path in ENV and RUN moved under the temp folder), with
  the Dockerfile's ENV and no other STEERSERVE_/virtualenv variables. What is not the image: ``.venv`` is made
  beforehand as a venv layered on this test's own environment (a ``.pth`` file adds its site-packages), so
  that ``deploy/install.sh``'s pip steps find torch, vLLM and the rest installed instead of downloading
  several GB; pip still installs steerserve itself (editable, with the extras the RUN line asks for) and
  its build backend, so the registry must be reachable as on a real build.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from steerserve.config import Settings

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the dev extra's tools sit beside the interpreter


def _tool(name: str) -> str:
    path = shutil.which(name, path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert path is not None, f"{name} is not installed: install the dev extra (STEERSERVE_EXTRAS=dev deploy/install.sh)"
    return path


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in (REPO / "Dockerfile").read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    out = []
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_lints_clean() -> None:
    r = subprocess.run([_tool("hadolint"), "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_file_matches_the_compose_spec() -> None:
    r = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_compose_file_agrees_with_nginx_and_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    replicas, pg, lb = services["steerserve"], services["postgres"], services["lb"]
    assert replicas["deploy"]["replicas"] >= 2
    nginx = (REPO / "deploy" / "nginx.conf").read_text()
    assert re.search(r"server steerserve:8000\b", nginx)  # the upstream is the replicas' service and port
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in lb["volumes"]
    assert lb["depends_on"]["steerserve"]["condition"] == "service_healthy"
    # The settings the replicas get: a store URL on the postgres service, a store folder on a shared volume.
    env = replicas["environment"]
    m = re.fullmatch(r"postgresql://(\w+):\$\{STEERSERVE_DB_PASSWORD:-\w+\}@postgres:5432/(\w+)",
                     env["STEERSERVE_STORE_URL"])
    assert m is not None and (m[1], m[2]) == (pg["environment"]["POSTGRES_USER"], pg["environment"]["POSTGRES_DB"])
    for key, value in env.items():  # the variable names are the ones the server reads
        monkeypatch.setenv(key, value)
    settings = Settings.from_env()
    assert (settings.store_url, settings.store_dir) == (env["STEERSERVE_STORE_URL"], Path(env["STEERSERVE_STORE_DIR"]))
    volume, mount = replicas["volumes"][0].split(":")
    assert volume in yaml.safe_load((REPO / "docker-compose.yml").read_text())["volumes"]
    assert settings.store_dir.is_relative_to(mount)


def _moved(root: Path, text: str) -> str:
    """``text`` with every absolute path (a word starting with /) moved under ``root``."""
    return re.sub(r"(?<![\w./])/(?=[\w.])", f"{root}/", text)


@pytest.fixture
def image_root(tmp_path: Path) -> Iterator[Path]:
    """The temp folder standing for the image's file system; removed afterwards (the model in it is 0.5 GB)."""
    yield tmp_path / "image"
    shutil.rmtree(tmp_path / "image", ignore_errors=True)


@pytest.mark.slow
def test_dockerfile_run_commands_outside_docker(image_root: Path) -> None:
    root = image_root
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("STEERSERVE_", "VIRTUAL_ENV", "VLLM_", "PYTHON"))}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != BIN)
    workdir, ran = root, []
    for word, args in _instructions():
        if word == "WORKDIR":
            workdir = Path(_moved(root, args))
            workdir.mkdir(parents=True, exist_ok=True)
        elif word == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = _moved(root, value)
        elif word == "COPY":
            *sources, dest = shlex.split(args)
            for src in sources:
                target = workdir / dest
                if (REPO / src).is_dir():  # as Docker does: the folder's contents into dest
                    shutil.copytree(REPO / src, target, dirs_exist_ok=True,
                                    ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(REPO / src, target / Path(src).name)
        elif word == "RUN":
            if not (workdir / ".venv").exists():
                _layered_venv(workdir / ".venv")
            command = _moved(root, args)
            r = subprocess.run(["/bin/sh", "-c", command], cwd=workdir, env=env, capture_output=True, text=True)
            assert r.returncode == 0, f"RUN {command}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
            ran.append(command)
        elif word == "CMD":
            cmd = json.loads(args)
    assert ran, "the Dockerfile has no RUN command"
    # What the RUN lines were for: steerserve installed with the postgres extra, the default model prepared
    # where STEERSERVE_MODELS_DIR points, and the CMD's program there.
    models = Path(env["STEERSERVE_MODELS_DIR"])
    assert (models / "SmolLM2-135M-Instruct" / "config.json").is_file(), sorted(models.rglob("*"))
    python = workdir / ".venv" / "bin" / "python"
    probe = "import psycopg, steerserve; print(steerserve.__file__)"
    r = subprocess.run([str(python), "-c", probe], cwd=workdir, env=env, capture_output=True, text=True, check=True)
    assert Path(r.stdout.strip()).is_relative_to(workdir), r.stdout  # the image's own copy, not this checkout
    r = subprocess.run([*cmd[:2], "--help"], cwd=workdir, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "--store-url" in r.stdout, r.stdout + r.stderr


def _layered_venv(path: Path) -> None:
    """A venv whose site-packages also holds this interpreter's (its .pth files included: editable installs)."""
    venv.EnvBuilder(with_pip=True).create(path)
    site = next((path / "lib").glob("python3*/site-packages"))
    shared = sysconfig.get_paths()["purelib"]
    # "zz": processed after the venv's own .pth files, so what pip installs into the venv comes first.
    (site / "zz-steerserve-test-base.pth").write_text(f"import site; site.addsitedir({shared!r})\n")


def test_serve_flags_for_replicas_and_tensor_parallel(monkeypatch: pytest.MonkeyPatch) -> None:
    from steerserve.cli import build_parser, serve_settings
    from steerserve.model import model_info, prepare_default_model
    from tests.paths import models_dir

    for key in ("STEERSERVE_STORE_URL", "STEERSERVE_STORE_DIR", "STEERSERVE_HOME"):
        monkeypatch.delenv(key, raising=False)
    parse = build_parser().parse_args
    s = serve_settings(parse(["serve", "--tensor-parallel-size", "2", "--engine-args", '{"seed": 3}',
                              "--store-url", "postgresql://u@db/steer", "--store-dir", "/shared/store"]))
    assert dict(s.engine_args) == {"seed": 3, "tensor_parallel_size": 2}
    assert (s.store_url, s.store_dir) == ("postgresql://u@db/steer", Path("/shared/store"))
    default = serve_settings(parse(["serve"]))
    assert (default.store_url, default.store_dir, dict(default.engine_args)) == (None, default.home / "store", {})
    with pytest.raises(ValueError, match="tensor-parallel-size"):
        serve_settings(parse(["serve", "--tensor-parallel-size", "0"]))
    # The flag reaches vLLM's own engine arguments (its distributed executor does the rest).
    pytest.importorskip("vllm")
    from transformers import AutoTokenizer
    from vllm.engine.arg_utils import AsyncEngineArgs

    from steerserve.engines.vllm.engine import VLLMEngine

    path = prepare_default_model(models_dir())
    engine = VLLMEngine(path, AutoTokenizer.from_pretrained(path), model_info(path, "float32"), s)
    args = AsyncEngineArgs(**engine.engine_args())
    assert (args.tensor_parallel_size, args.seed) == (2, 3)


def test_a_store_url_that_is_not_postgres_is_refused_at_the_flags(capsys: pytest.CaptureFixture[str]) -> None:
    from steerserve.cli import main

    with pytest.raises(SystemExit) as exit_:  # before any model is loaded
        main(["serve", "--store-url", "mysql://u@db/steer"])
    assert exit_.value.code == 2 and "store_url must be a postgresql://" in capsys.readouterr().err
