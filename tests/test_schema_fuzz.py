"""The OpenAPI document is true: schemathesis generates requests from it and checks every answer against it.

Every operation gets positive (schema-conforming) and negative (schema-violating) requests, the admin key
included; each response must be no 5xx, a documented status, a documented content type, and a body that
matches its documented schema (for event streams, every event). The run is bounded (a fixed number of
examples per operation and mode, derandomized) so that it takes a couple of minutes on two cores.

The app under test runs on an hf engine of its own (``hf_engine``) with an artifact store of its own, so
that fuzzed deletes cannot touch other tests' vectors.
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hypothesis_settings
from hypothesis.errors import Unsatisfiable
from hypothesis.strategies import SearchStrategy
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.errors import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.types import ASGIApp, Receive, Scope, Send

from steerserve.api import create_app
from steerserve.config import Settings
from steerserve.engines.hf import HFEngine
from steerserve.prompts import PromptRenderer
from steerserve.service import Service
from steerserve.store.artifacts import ArtifactStore

ADMIN = {"Authorization": "Bearer test-key"}
EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 20}  # per operation
# Short generations keep the run short: the fuzzed app caps max_tokens lower than the live server does (and
# so documents the lower cap); the document's examples ask for 8.
MAX_TOKENS, DEFAULT_MAX_TOKENS = 8, 2
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


class WithoutLifespan:
    """The app, answering its lifespan itself: the engine is the live server's, already started."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return


@pytest.fixture(scope="module")
def fuzz_app(hf_engine: HFEngine, settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The app on an hf engine of this module's own (schemathesis calls it from its own event loop, which
    the vllm engine's front end, bound to the live server's loop, cannot serve), with its own store."""
    store = ArtifactStore(tmp_path_factory.mktemp("fuzz-store") / hf_engine.info.fingerprint, hf_engine.info)
    fuzz_settings = replace(settings, engine="hf", max_tokens_cap=MAX_TOKENS, default_max_tokens=DEFAULT_MAX_TOKENS)
    renderer = PromptRenderer(hf_engine.tokenizer, fuzz_settings.max_prompt_tokens, fuzz_settings.max_prompt_chars)
    own = Service(fuzz_settings, hf_engine, store, renderer)
    yield create_app(own, fuzz_settings)
    store.close()


def test_openapi_document_states_the_error_shape(fuzz_app: Any) -> None:
    """No 422 anywhere; every operation documents its errors; media types as served."""
    doc = fuzz_app.openapi()
    assert "HTTPValidationError" not in doc["components"]["schemas"]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            responses = op["responses"]
            assert "422" not in responses, (method, path)
            assert {"413", "500"} <= set(responses), (method, path)
            for status, response in responses.items():
                if int(status) >= 400:
                    assert response["content"] == {"application/json": {"schema": {
                        "$ref": "#/components/schemas/ErrorResponse"}}}, (method, path, status)
            if path.startswith("/admin/"):
                assert {"400", "401", "403"} <= set(responses) and op["security"] == [{"adminKey": []}]
            if op.get("requestBody") or any(p["in"] == "query" for p in op.get("parameters", [])):
                assert "400" in responses, (method, path)
    for path in ("/generate", "/v1/chat/completions", "/v1/completions"):
        assert set(doc["paths"][path]["post"]["responses"]["200"]["content"]) == {"application/json",
                                                                                   "text/event-stream"}
    assert set(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    schemas = doc["components"]["schemas"]
    assert schemas["ComputeVector"]["properties"]["name"]["pattern"] == "^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
    assert schemas["ComputeVector"]["properties"]["positive"]["minItems"] == 1
    assert schemas["PairCreate"]["properties"]["description"]["maxLength"] == 1024
    max_tokens = schemas["GenerateRequest"]["properties"]["max_tokens"]["anyOf"][0]
    assert (max_tokens["minimum"], max_tokens["maximum"]) == (1, MAX_TOKENS)  # the app's max_tokens_cap
    layers = schemas["ComputeVector"]["properties"]["layers"]["anyOf"][0]["items"]
    assert (layers["minimum"], layers["maximum"]) == (0, 29)  # the default model's 30 layers


def test_schemathesis_finds_nothing(fuzz_app: Any) -> None:
    schema = schemathesis.openapi.from_dict(copy.deepcopy(fuzz_app.openapi()))
    schema.app = WithoutLifespan(fuzz_app)
    requests: Counter[str] = Counter()
    statuses: Counter[tuple[str, int]] = Counter()
    failures: list[str] = []
    started = time.monotonic()
    def fuzz(label: str, mode: GenerationMode, strategy: SearchStrategy[Any], examples: int) -> None:
        @hypothesis_settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                             phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=strategy)
        def run(case: Any) -> None:
            requests[label] += 1
            try:
                response = case.call(headers=dict(ADMIN), timeout=60)
                statuses[label, response.status_code] += 1
                case.validate_response(response, checks=CHECKS)
            except (Exception, FailureGroup) as exc:  # the checks failed, or the app raised through the transport
                failures.append(f"{label} ({mode}): {str(exc).strip()[:1500]}")

        try:
            run()
        except Unsatisfiable:  # negative mode on an operation that takes nothing: there is nothing to violate
            assert mode == GenerationMode.NEGATIVE, label

    for result in schema.get_all_operations():
        if not isinstance(result, Ok):
            failures.append(f"the document has an operation schemathesis cannot use: {result.err()}")
            continue
        operation = result.ok()
        for strategy in schema.get_strategies_from_examples(operation):  # the document's own examples
            fuzz(operation.label, GenerationMode.POSITIVE, strategy, 1)
        for mode, examples in EXAMPLES.items():
            fuzz(operation.label, mode, operation.as_strategy(generation_mode=mode, headers=dict(ADMIN)), examples)
    took = time.monotonic() - started
    print(f"\nschemathesis: {sum(requests.values())} requests over {len(requests)} operations in {took:.0f}s, "
          f"{len(failures)} failures")
    for label in requests:
        print(f"  {label:40} {requests[label]:4} requests, statuses "
              f"{ {s: n for (lb, s), n in sorted(statuses.items()) if lb == label} }")
    for failure in failures[:20]:
        print("-" * 100 + "\n" + failure)
    assert len(requests) >= 18
    assert not failures, f"{len(failures)} failing requests (first ones printed above)"


def test_fuzz_store_is_its_own(fuzz_app: Any, service: Service) -> None:
    """The fuzzed admin routes wrote to a store of their own, not the live server's."""
    own: Path = fuzz_app.state.service.store.root
    assert own != service.store.root
