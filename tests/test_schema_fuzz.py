"""The OpenAPI document is true: schemathesis generates requests from it and checks every answer against it.

Schemathesis's own engine runs every phase, as its CLI does: the document's examples, coverage (boundary
values, every constraint violated in turn, methods the paths do not have), fuzzing, and stateful sequences
(links it infers between the admin routes). Requests are positive (schema-conforming) and negative
(schema-violating), the admin key included; every check but one must pass: no 5xx, a documented status,
content type and headers, a body that matches its documented schema (for event streams, every event), 405s
with a true ``Allow``, negative data refused. The run is bounded (a fixed number of examples per operation,
derandomized) so that it takes a few minutes on two cores.

The app under test runs on an hf engine of its own (``hf_engine``) with an artifact store of its own, so
that fuzzed deletes cannot touch other tests' vectors.
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import schemathesis.engine
from schemathesis.config import SchemathesisConfig
from schemathesis.engine import events
from schemathesis.engine.recorder import Interaction, ScenarioRecorder
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Receive, Scope, Send

from steerserve.api import create_app
from steerserve.config import Settings
from steerserve.engines.hf import HFEngine
from steerserve.methods import REGISTRY
from steerserve.prompts import PromptRenderer
from steerserve.service import Service
from steerserve.store.artifacts import ArtifactStore

ADMIN = {"Authorization": "Bearer test-key"}
# Short generations keep the run short: the fuzzed app caps max_tokens lower than the live server does (and
# so documents the lower cap); the document's examples ask for 8.
MAX_TOKENS, DEFAULT_MAX_TOKENS = 8, 2
ENGINE_CONFIG: dict[str, Any] = {
    "seed": 1,
    "headers": ADMIN,
    "workers": 1,  # the engine is one hf model on two cores: more workers only queue behind it
    "request-timeout": 60,
    "continue-on-failure": True,  # every failure, not the first per operation
    "generation": {"mode": "all", "max-examples": 20, "deterministic": True, "database": "none"},
    "phases": {"examples": {"fill-missing": True}, "stateful": {"max-steps": 10}},
    "checks": {
        # Schema-valid requests the server refuses for what JSON Schema cannot say: an intervention's or a
        # policy's artifacts and policies must exist, each method has its own parameters, a chat template its
        # role order, a vector the model's hidden size and a KL budget, a prompt's tokens a cap. What it can
        # say is in the document (exactly one of prompt/messages, method names, lengths, ranges).
        "positive_data_acceptance": {"enabled": False},
        # A request's own ``timeout`` (the coverage phase sends the smallest float above 0) ends in the
        # documented 504 deadline_exceeded; every 504 is held to that below.
        "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "504"]},
    },
}
TESTING_PHASES = {"examples", "coverage", "fuzzing", "stateful"}


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
    layers = schemas["ComputeVector"]["properties"]["layers"]["anyOf"][0]
    assert (layers["minItems"], layers["items"]["minimum"], layers["items"]["maximum"]) == (1, 0, 29)  # 30 layers
    # What the code refuses, stated where JSON Schema can: one of prompt/messages, logprobs for top_logprobs,
    # the registry's method names, versions from 1.
    assert [b["required"] for b in schemas["GenerateRequest"]["oneOf"]] == [["prompt"], ["messages"]]
    assert schemas["GenerateRequest"]["properties"]["messages"]["anyOf"][0]["minItems"] == 1
    assert {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}} in schemas[
        "ChatCompletionRequest"]["anyOf"]
    assert schemas["MandatoryIntervention"]["properties"]["method"]["enum"] == sorted(REGISTRY)
    assert schemas["PolicyBody"]["properties"]["method_caps"]["propertyNames"] == {"enum": sorted(REGISTRY)}
    assert schemas["EnableVector"]["properties"]["version"]["anyOf"][0]["minimum"] == 1
    assert "enum" not in schemas["Applied"]["properties"]["method"]  # responses report methods, any of them
    # A client key over its rate (or unknown) is refused before routing: on every generation route.
    for path, item in doc["paths"].items():
        if path == "/generate" or path.startswith("/v1/"):
            for op in item.values():
                assert {"401", "429"} <= set(op["responses"]), path


def test_405_allows_what_the_document_lists(fuzz_app: Any) -> None:
    """``Allow`` names every method of the path (Starlette's names the first route it tried), as OpenAPI
    matches paths: ``/admin/vectors/compute`` is its own path, not ``/admin/vectors/{name}``."""
    doc = fuzz_app.openapi()
    with TestClient(WithoutLifespan(fuzz_app)) as client:
        for path, methods in (("/admin/vectors/joy", {"GET", "PATCH", "DELETE"}),
                              ("/admin/vectors/compute", {"POST"}), ("/admin/policies/p", {"GET", "PUT", "DELETE"}),
                              ("/v1/models", {"GET"})):
            r = client.request("OPTIONS", path, headers=ADMIN)
            assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed", r.text
            allowed = set(r.headers["allow"].split(", "))
            assert allowed - {"HEAD"} == methods, (path, allowed)
            template = path if path in doc["paths"] else path.rsplit("/", 1)[0] + ("/{name}")
            assert {m.upper() for m in doc["paths"][template]} == methods, path


def test_schemathesis_finds_nothing(fuzz_app: Any) -> None:
    config = SchemathesisConfig.from_dict(ENGINE_CONFIG)
    schema = schemathesis.openapi.from_dict(copy.deepcopy(fuzz_app.openapi()), config=config)
    schema.app = WithoutLifespan(fuzz_app)
    run = FuzzRun()
    started = time.monotonic()
    for event in schemathesis.engine.from_schema(schema).execute():
        run.record(event)
    took = time.monotonic() - started
    run.report(took)
    assert set(run.phases) == TESTING_PHASES and all(s == "success" for s in run.phases.values()), run.phases
    assert len({label for label, _ in run.requests}) >= 28
    assert not run.failures, f"{len(run.failures)} failures (the first of each kind printed above)"


class FuzzRun:
    """What the engine's events say: requests by operation and phase, statuses, failures."""

    def __init__(self) -> None:
        self.requests: Counter[tuple[str, str]] = Counter()
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.phases: dict[str, str] = {}
        self.failures: list[str] = []

    def record(self, event: events.EngineEvent) -> None:
        if isinstance(event, events.ScenarioFinished):
            self._scenario(str(event.phase), event.recorder)
        elif isinstance(event, events.PhaseFinished) and str(event.phase.name) in TESTING_PHASES:
            self.phases[str(event.phase.name)] = str(event.status)
        elif isinstance(event, events.NonFatalError):
            self.failures.append(f"{event.label} [{event.phase}] error: {event.info.title}\n{event.info.message}")
        elif isinstance(event, events.FatalError):
            self.failures.append(f"fatal error: {event.exception!r}")

    def _scenario(self, phase: str, recorder: ScenarioRecorder) -> None:
        for case_id, interaction in recorder.interactions.items():
            label = recorder.cases[case_id].value.operation.label
            self.requests[label, phase] += 1
            if interaction.response is None:
                continue
            self.statuses[label, interaction.response.status_code] += 1
            if interaction.response.status_code == 504 and not _own_deadline(interaction):
                self.failures.append(f"{label} [{phase}] a 504 that is not the request's own deadline\n"
                                     f"{interaction.response.content[:300]!r}")
        for case_id, checks in recorder.checks.items():
            for check in checks:
                if check.failure_info is None:
                    continue
                info, answered = check.failure_info, recorder.interactions.get(case_id)
                answer = "" if answered is None or answered.response is None else (
                    f"{answered.response.status_code} {answered.response.content[:300]!r}")
                self.failures.append(f"{recorder.label} [{phase}] {check.name}: {info.failure.title}\n"
                                     f"{info.failure.message[:300]}\n{info.code_sample[:700]}\n-> {answer}")

    def report(self, took: float) -> None:
        labels = sorted({label for label, _ in self.requests})
        print(f"\nschemathesis: {sum(self.requests.values())} requests over {len(labels)} operations in {took:.0f}s, "
              f"{len(self.failures)} failures; phases {self.phases}")
        for label in labels:
            print(f"  {label:36} { {p: n for (lb, p), n in self.requests.items() if lb == label} } statuses "
                  f"{ {s: n for (lb, s), n in sorted(self.statuses.items()) if lb == label} }")
        kinds = Counter(f.split("\n")[0] for f in self.failures)
        for kind, n in kinds.most_common():
            print(f"{n:4} x {kind}")
        shown = set()
        for failure in self.failures:
            if failure.split("\n")[0] not in shown:
                shown.add(failure.split("\n")[0])
                print("-" * 100 + "\n" + failure)


def _own_deadline(interaction: Interaction) -> bool:
    """A 504 is the request's own ``timeout`` passing (deadline_exceeded), not the server's."""
    assert interaction.response is not None
    body = json.loads(interaction.request.body or b"{}")
    error = json.loads(interaction.response.content)["error"]
    return isinstance(body, dict) and body.get("timeout") is not None and error["code"] == "deadline_exceeded"


def test_fuzz_store_is_its_own(fuzz_app: Any, service: Service) -> None:
    """The fuzzed admin routes wrote to a store of their own, not the live server's."""
    own: Path = fuzz_app.state.service.store.root
    assert own != service.store.root
