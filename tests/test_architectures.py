"""Every dense architecture family of ``steerserve.anatomy`` on a tiny random model of its own config class
(``tests.arch_models``): steering means the same thing on both engines, whatever a block returns.

Per architecture, one hf engine and one vLLM engine (``AsyncLLM``, engine core in its own process, vLLM run
eagerly: ``enforce_eager``; the compiled path of the op is covered on the default model by
``test_vllm_engine``, and for a 2-layer model compilation only adds start-up time):
- with the hooks installed and nothing requested, the logits are bit-identical to the bare model's, and a
  GGUF control vector written for the model reads back on the same layer numbers;
- in one shared vLLM batch, an unsteered request, ``add`` on every layer, ``ablate`` on every layer, an
  ``actadd`` pair (each engine capturing its own pair states) and an entropic closed loop give the same
  greedy tokens as each alone on the hf engine, and the steered ones differ from unsteered;
Each architecture's outcomes are recorded (``tests.arch_results``) for ``scripts/arch_table.py``, which
writes the README's table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch

try:
    import vllm  # noqa: F401
except Exception as exc:  # not installed, or installed with a broken torchvision
    pytest.skip(f"vLLM is not importable here ({type(exc).__name__}: {exc}); install the 'cpu' extra",
                allow_module_level=True)

from transformers import AutoTokenizer

from steerserve.anatomy import UnsupportedArchitecture, hf_head
from steerserve.config import Settings
from steerserve.engines.base import GenerationRequest, SamplingParams
from steerserve.engines.hf import HFEngine
from steerserve.engines.vllm.engine import VLLMEngine
from steerserve.model import load_hf, model_info, prepare_default_model
from steerserve.runtime.loop import LoopSpec
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef
from steerserve.store.formats import export_bytes, file_header, from_gguf
from tests import arch_models
from tests.arch_results import record
from tests.paths import models_dir

N = 12  # new tokens per request
Spec = tuple[SteerOp, ...]
NAMES = (("unsteered", 0), ("add", 1), ("ablate", 2), ("actadd", 3), ("closed_loop", 4))  # the batch's rows


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root, tokenizer = tmp_path_factory.mktemp("arch-models"), prepare_default_model(models_dir())
    return {arch: arch_models.build(arch, root / arch, tokenizer) for arch in arch_models.ARCHS}


async def _vllm(path: Path) -> VLLMEngine:
    vl = VLLMEngine(path, AutoTokenizer.from_pretrained(path), model_info(path),
                    Settings(bank_slots=32, max_batch=8,
                             engine_args={"enforce_eager": True, "max_model_len": 512, "enable_prefix_caching": False,
                                          "distributed_executor_backend": "uni"}))
    await vl.start()
    return vl


@pytest.fixture(scope="module")
async def starting(checkpoints: dict[str, Path]) -> AsyncIterator[dict[str, asyncio.Task[VLLMEngine]]]:
    """vLLM engines being started ahead of their turn (each start is mostly one process's single-threaded
    imports and loading: two overlap on two cores); any never used is stopped when the module ends."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    tasks: dict[str, asyncio.Task[VLLMEngine]] = {}
    yield tasks
    for task in tasks.values():
        with contextlib.suppress(Exception):
            await (await task).stop()


@pytest.fixture(scope="module", params=arch_models.ARCHS)
async def engines(request: pytest.FixtureRequest, checkpoints: dict[str, Path],
                  starting: dict[str, asyncio.Task[VLLMEngine]]) -> AsyncIterator[tuple[str, HFEngine, VLLMEngine]]:
    arch = str(request.param)
    task = starting.pop(arch, None) or asyncio.create_task(_vllm(checkpoints[arch]))
    following = arch_models.ARCHS[arch_models.ARCHS.index(arch) + 1:]
    if following and following[0] not in starting:  # the next architecture's engine starts while this one is tested
        starting[following[0]] = asyncio.create_task(_vllm(checkpoints[following[0]]))
    model, tokenizer, info = load_hf(checkpoints[arch])
    hf = HFEngine(model, tokenizer, info, Settings(max_batch=8, bank_slots=32))
    await hf.start()
    vl = await task
    yield arch, hf, vl
    await vl.stop()
    await hf.stop()


def _prompts(n: int, seed: int) -> list[tuple[int, ...]]:
    g = torch.Generator().manual_seed(seed)
    return [tuple(int(t) for t in torch.randint(100, 40000, (10 + i,), generator=g)) for i in range(n)]


def _unit(seed: int, hidden: int, norm: float = 1.0) -> VectorRef:
    v = torch.randn(hidden, generator=torch.Generator().manual_seed(seed))
    return VectorRef.of(v / v.norm() * norm)


async def _run(engine: Any, ids: Sequence[int], ops: Spec, loop: LoopSpec | None = None) -> list[int]:
    req = GenerationRequest(uuid.uuid4().hex, tuple(ids), SamplingParams(max_tokens=N, ignore_eos=True), ops, loop)
    return [t for o in [o async for o in engine.generate(req)] for t in o.token_ids]


async def _actadd(engine: Any, plus: Sequence[int], minus: Sequence[int], layer: int, coeff: float) -> Spec:
    """An ActAdd op from the engine's own capture of the pair (vLLM: a capture request through its worker)."""
    hp, hm = await engine.hidden_states([plus, minus], [layer])  # [n, 1, H] each
    diff = hp[:, 0] - hm[:, 0]  # [n, H]
    return (SteerOp(OpKind.ADD, layer, VectorRef.of(diff), coeff, 0, diff.shape[0], positional=True),)


async def test_hooks_installed_nothing_requested_is_bit_identical(checkpoints: dict[str, Path]) -> None:
    for arch, path in checkpoints.items():
        model, tokenizer, info = load_hf(path)
        ids = torch.tensor([_prompts(1, 5)[0]])
        with torch.inference_mode():
            bare = model(input_ids=ids).logits
            hf = HFEngine(model, tokenizer, info, Settings(max_batch=2, bank_slots=8))  # hooks on every layer
            hooked = model(input_ids=ids).logits
        hf.hooks.remove()
        ok = torch.equal(bare, hooked)
        record(info.architecture, "identity", ok)
        assert ok, arch
        # a GGUF control vector written for the model reads back on the same layers (llama.cpp has no layer 0)
        vectors = {layer: _unit(layer, info.hidden_size).data[0] for layer in range(info.num_layers)}
        data = export_bytes(info, "vector", file_header(info, "vector"), vectors, "gguf", drop_layer_0=True)
        back = safetensors.torch.load(from_gguf(info, data)[0])
        same = {int(k.split(".")[1]) for k in back} == set(vectors) - {0} and all(
            torch.equal(back[f"layer.{k}"], vectors[k]) for k in vectors if k)
        record(info.architecture, "gguf", same)
        assert same, arch


async def test_steering_matches_hf_in_one_batch(engines: tuple[str, HFEngine, VLLMEngine]) -> None:
    arch, hf, vl = engines
    await check_steering(arch, hf, vl)


async def check_steering(arch: str, hf: HFEngine, vl: VLLMEngine) -> None:
    """The shared-batch check of the module docstring on one architecture's engines, recorded per check
    (``test_vllm_moe`` runs it on the MoE engines too)."""
    info = hf.info
    layers = range(info.num_layers)
    ps = _prompts(5, seed=3)
    states = (await hf.hidden_states(ps[:1], list(layers)))[0][1:]  # [n, L, H]
    norm = 2.0 * float(states.norm(dim=-1).mean(0).max())  # above the stream's: every steered request must move
    add = tuple(SteerOp(OpKind.ADD, layer, _unit(7, info.hidden_size, norm), 1.0) for layer in layers)
    # ablate, on every layer, the head's row of the token the unsteered request would emit first (a random
    # direction would barely move a 128-wide stream): its logit then falls to about 0
    first = (await _run(hf, ps[2], ()))[0]
    r = torch.nn.functional.normalize(hf_head(hf.model).weight.detach()[first].float(), dim=0)
    ablate = tuple(SteerOp(OpKind.ABLATE, layer, VectorRef.of(r), 1.0) for layer in layers)
    # the pair as long as its prompt, so that ActAdd's front positions reach the last prompt token
    plus, minus = (tuple(int(t) for t in torch.randint(100, 40000, (len(ps[3]),), generator=torch.Generator()
                                                         .manual_seed(seed))) for seed in (9, 10))
    loop = LoopSpec(target=0.0, initial=1.0, kp=1.0, ki=0.5)
    closed = (SteerOp(OpKind.ADD, info.num_layers - 1, _unit(11, info.hidden_size, norm), 1.0, len(ps[4]) - 1,
                      gain=True),)
    hf_specs: list[tuple[Spec, LoopSpec | None]] = [((), None), (add, None), (ablate, None),
                                                     (await _actadd(hf, plus, minus, 0, 4.0), None), (closed, loop)]
    vl_specs = [*hf_specs[:3], (await _actadd(vl, plus, minus, 0, 4.0), None), hf_specs[4]]
    got = await asyncio.gather(*(_run(vl, p, ops, lp) for p, (ops, lp) in zip(ps, vl_specs, strict=True)))
    want = [await _run(hf, p, ops, lp) for p, (ops, lp) in zip(ps, hf_specs, strict=True)]
    plain = [await _run(hf, p, ()) for p in ps]
    for name, i in NAMES:
        same = got[i] == want[i]
        record(info.architecture, name, same and (i == 0 or want[i] != plain[i]))
    assert got == want, arch
    still = [name for name, i in NAMES[1:] if want[i] == plain[i]]
    assert not still, f"{arch}: {still} left the tokens unsteered"  # every spec moved them: a real check


def test_unknown_architecture_is_refused_at_start(tmp_path: Path) -> None:
    path = arch_models.build("llama", tmp_path / "m", prepare_default_model(models_dir()))
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(UnsupportedArchitecture) as err:
        model_info(path)
    assert "'MambaForCausalLM' is not supported" in str(err.value) and "GPT2LMHeadModel" in str(err.value)
