"""The HTTP edge under hostile input: body caps, the admin key before the body, prompt size, lone surrogates.

Each test here is a regression test for a failure found by fuzzing. The ASGI-level tests drive the app with
a ``receive`` that counts what it hands out, so "refused without reading the body" is checked, not assumed.
"""

from __future__ import annotations

import asyncio
import json
import select
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from starlette.types import ASGIApp, Message

from steerserve.api import create_app
from steerserve.api.app import validation_error
from steerserve.config import Settings
from steerserve.errors import SteerError
from steerserve.prompts import DEFAULT_MAX_PROMPT_CHARS, PromptRenderer
from steerserve.service import Service
from steerserve.spec import PromptInfo
from tests.conftest import random_unit_vectors

MiB = 1024 * 1024
ADMIN = {"Authorization": "Bearer test-key"}
HI = [{"role": "user", "content": "Hi"}]


# ---- helpers ----------------------------------------------------------------------------------------


class Body:
    """An ASGI ``receive`` that hands out ``count`` chunks lazily and records how many were taken."""

    def __init__(self, count: int, chunk: bytes = b"x" * MiB) -> None:
        self.count, self.chunk, self.taken = count, chunk, 0

    async def __call__(self) -> Message:
        if self.taken >= self.count:
            return {"type": "http.disconnect"}
        self.taken += 1
        return {"type": "http.request", "body": self.chunk, "more_body": self.taken < self.count}


async def asgi(app: ASGIApp, method: str, path: str, headers: Mapping[str, str],
               receive: Body) -> tuple[int, dict[str, str], dict[str, Any]]:
    """(status, headers, JSON body) of one request made straight through the ASGI interface."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
             "client": ("127.0.0.1", 5000), "server": ("test", 80)}
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode(): v.decode() for k, v in start["headers"]}, json.loads(body)


def error(status: int, body: dict[str, Any], param: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, body
    assert err["param"] == param, err
    return err


@pytest.fixture(scope="module")
def app(service: Service, settings: Settings) -> ASGIApp:
    """The app, without its lifespan: the live server owns the engine, and nothing here reaches it."""
    return create_app(service, settings)


@pytest.fixture(scope="module")
async def ac(app: ASGIApp) -> Any:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


def _routes(app: Any) -> list[tuple[str, str]]:
    out = []
    for route in app.routes:
        for method in sorted(getattr(route, "methods", None) or ()):
            if method != "HEAD" and route.path not in ("/docs", "/redoc", "/docs/oauth2-redirect"):
                out.append((method, route.path.replace("{name}", "v").replace("{model:path}", "m")))
    return out


# ---- 1. body caps -----------------------------------------------------------------------------------


async def test_declared_oversize_body_is_refused_unread(app: ASGIApp) -> None:
    body = Body(50)
    status, headers, out = await asgi(app, "POST", "/generate",
                                      {"content-type": "application/json", "content-length": str(50 * MiB)}, body)
    assert status == 413
    assert error(status, out)["code"] == "too_large"
    assert body.taken == 0  # refused on the header alone
    assert headers["connection"] == "close"  # the server hangs up instead of draining 50 MB


async def test_streamed_oversize_body_stops_at_the_limit(app: ASGIApp, settings: Settings) -> None:
    body = Body(50)  # chunked: no Content-Length
    status, headers, out = await asgi(app, "POST", "/generate", {"content-type": "application/json"}, body)
    assert status == 413 and headers["connection"] == "close"
    error(status, out)
    assert body.taken == settings.max_body_bytes // MiB + 1  # read up to the limit, not one chunk more


async def test_every_route_is_capped(app: Any, settings: Settings) -> None:
    routes = _routes(app)
    assert len(routes) >= 15
    for method, path in routes:
        big = settings.max_upload_bytes if (method, path) == ("POST", "/admin/vectors") else settings.max_body_bytes
        body = Body(1)
        status, _, out = await asgi(app, method, path, {**ADMIN, "content-length": str(big + 1)}, body)
        assert (status, body.taken) == (413, 0), (method, path, out)


async def test_upload_route_has_the_upload_limit(app: ASGIApp, settings: Settings) -> None:
    # 5 MiB of not-JSON on the upload route is read and parsed (400), not refused for its size ...
    body = Body(5)
    status, _, out = await asgi(app, "POST", "/admin/vectors", {**ADMIN, "content-type": "application/json"}, body)
    assert status == 400 and body.taken == 5, out
    assert error(status, out)["code"] == "invalid_json"
    # ... while the same on the compute route, a JSON route, is over its limit.
    body = Body(5)
    status, _, out = await asgi(app, "POST", "/admin/vectors/compute", {**ADMIN, "content-type": "application/json"},
                                body)
    assert status == 413 and body.taken == settings.max_body_bytes // MiB + 1
    status, _, _ = await asgi(app, "POST", "/admin/vectors",
                              {**ADMIN, "content-length": str(settings.max_upload_bytes + 1)}, Body(1))
    assert status == 413


# ---- 3. the admin key before the body ---------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["no key", "wrong key"])
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_admin_key_is_checked_before_the_body(app: ASGIApp, headers: dict[str, str], declared: bool) -> None:
    body = Body(50)
    length = {"content-length": str(50 * MiB)} if declared else {"transfer-encoding": "chunked"}
    started = time.perf_counter()
    status, out_headers, out = await asgi(app, "POST", "/admin/vectors",
                                          {**headers, **length, "content-type": "application/json"}, body)
    assert time.perf_counter() - started < 1.0
    assert status == 401 and body.taken == 0
    assert out_headers["www-authenticate"] == "Bearer" and out_headers["connection"] == "close"
    assert error(status, out)["type"] == "authentication_error"


async def test_admin_disabled_is_checked_before_the_body(service: Service, settings: Settings) -> None:
    app = create_app(service, replace(settings, admin_key=None))
    body = Body(50)
    status, _, out = await asgi(app, "POST", "/admin/pairs", {**ADMIN, "content-length": str(50 * MiB)}, body)
    assert status == 403 and body.taken == 0
    assert "STEERSERVE_ADMIN_KEY" in error(status, out)["message"]


async def test_unknown_admin_paths_need_the_key_too(ac: httpx.AsyncClient) -> None:
    r = await ac.get("/admin/nothing-here")
    assert r.status_code == 401
    assert (await ac.get("/admin/nothing-here", headers=ADMIN)).status_code == 404


# ---- 1. prompt size and tokenizing off the event loop -----------------------------------------------


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/generate", {"prompt": "x" * (DEFAULT_MAX_PROMPT_CHARS + 1)}, "prompt"),
    ("/generate", {"messages": [{"role": "system", "content": "x" * 40000}, {"role": "user", "content": "y" * 40000}]},
     "messages.1.content"),
    ("/v1/completions", {"prompt": ["x" * (DEFAULT_MAX_PROMPT_CHARS + 1)]}, "prompt"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * (DEFAULT_MAX_PROMPT_CHARS + 1)}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "x" * 40000}, {"type": "text", "text": "y" * 40000}]}]}, "messages.0.content"),
    ("/generate", {"prompt": "Hi", "steering": {"interventions": [
        {"method": "actadd", "positive": "x" * (DEFAULT_MAX_PROMPT_CHARS + 1), "negative": "n", "layer": 3}]}},
     "steering.interventions.0.positive"),
])
async def test_prompt_characters_are_capped_before_tokenizing(ac: httpx.AsyncClient, path: str,
                                                              body: dict[str, Any], param: str) -> None:
    r = await ac.post(path, json={"max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    assert str(DEFAULT_MAX_PROMPT_CHARS) in error(400, r.json(), param)["message"]


def test_renderer_char_limit_is_a_constructor_argument(service: Service) -> None:
    tokenizer = service.renderer.tokenizer
    assert PromptRenderer(tokenizer, 2048).max_prompt_chars == DEFAULT_MAX_PROMPT_CHARS
    small = PromptRenderer(tokenizer, 2048, max_prompt_chars=10)
    assert small.render(prompt="0123456789").token_ids
    with pytest.raises(SteerError) as info:
        small.render(prompt="01234567890")
    assert info.value.field == "prompt"
    with pytest.raises(SteerError) as info:
        small.render(messages=[{"role": "user", "content": "012345"}, {"role": "user", "content": "67890"}])
    assert info.value.field == "messages.1.content"


class _ThreadRecorder(PromptRenderer):
    def __init__(self, tokenizer: Any) -> None:
        super().__init__(tokenizer, 2048)
        self.threads: list[int] = []

    def render(self, prompt: str | None = None, messages: Sequence[Mapping[str, str]] | None = None,
               where: str = "prompt") -> PromptInfo:
        self.threads.append(threading.get_ident())
        raise SteerError("recorded", field=where)


class _IdleEngine:
    def __init__(self, engine: Any) -> None:
        self.info, self.hidden_states = engine.info, engine.hidden_states


@pytest.mark.parametrize(("path", "body"), [
    ("/generate", {"prompt": "Hi"}), ("/generate", {"messages": HI}),
    ("/v1/chat/completions", {"messages": HI}), ("/v1/completions", {"prompt": "Hi"}),
])
async def test_prompts_are_rendered_off_the_event_loop(service: Service, settings: Settings, path: str,
                                                       body: dict[str, Any]) -> None:
    renderer = _ThreadRecorder(service.renderer.tokenizer)
    engine: Any = _IdleEngine(service.engine)
    app = create_app(Service(settings, engine, service.store, renderer), settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        r = await c.post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["message"].endswith("recorded")
    assert renderer.threads and threading.get_ident() not in renderer.threads


def _prompt_body(size: int) -> bytes:
    """A valid JSON body of exactly ``size`` bytes: one long prompt (what took minutes to refuse before)."""
    head, tail = b'{"prompt": "', b'", "max_tokens": 1}'
    filler = size - len(head) - len(tail)
    return head + (b"word " * (filler // 5 + 1))[:filler] + tail


def _upload(url: str, path: str, size: int, chunked: bool, headers: Mapping[str, str]) -> int | None:
    """POST a ``size``-byte body over a raw socket, reading the answer as soon as there is one.

    Returns the status, or None when the server hung up before an answer could be read (it may reset the
    connection after refusing: it does not drain an upload it will not use).
    """
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=60)
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {size}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    body = memoryview(_prompt_body(size))
    try:
        sock.sendall(head.encode())
        sent = 0
        while sent < size and not select.select([sock], [], [], 0)[0]:
            piece = body[sent: sent + MiB]
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            sent += len(piece)
        if sent >= size and chunked:
            sock.sendall(b"0\r\n\r\n")
        answer = sock.recv(65536)
        return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
    except (ConnectionResetError, BrokenPipeError):
        return None
    finally:
        sock.close()


def _health_while(base_url: str, work: Callable[[], Any]) -> tuple[float, int, Any]:
    """Run ``work`` in a thread while probing /health; (slowest probe in seconds, probes, work's result)."""
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(work()), daemon=True)
    slowest, probes = 0.0, 0
    with httpx.Client(base_url=base_url, timeout=30) as probe:
        assert probe.get("/health").status_code == 200  # connection open before the work starts
        thread.start()
        while thread.is_alive() or probes < 5:
            started = time.perf_counter()
            assert probe.get("/health").status_code == 200
            slowest, probes = max(slowest, time.perf_counter() - started), probes + 1
            time.sleep(0.02)
    thread.join()
    return slowest, probes, result[0] if result else None


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(("path", "headers"), [("/generate", {}), ("/admin/pairs", {}),
                                               ("/admin/vectors/compute", ADMIN)], ids=["generate", "anon", "admin"])
def test_health_answers_while_a_50mb_body_is_refused(base_url: str, path: str, headers: dict[str, str],
                                                     chunked: bool) -> None:
    started = time.perf_counter()
    slowest, probes, status = _health_while(base_url, lambda: _upload(base_url, path, 50 * MiB, chunked, headers))
    took = time.perf_counter() - started
    assert slowest < 1.0, f"/health took {slowest:.2f}s"
    assert status in (413, 401, None)  # None: reset after the refusal, the rest of the upload unread
    assert took < 10
    print(f"{path} chunked={chunked}: status {status} after {took:.2f}s, slowest /health {slowest * 1000:.0f} ms "
          f"over {probes} probes")


def test_health_answers_while_near_limit_prompts_are_refused(base_url: str, settings: Settings) -> None:
    near_body = {"prompt": "word " * ((settings.max_body_bytes - 1024) // 5), "max_tokens": 1}
    at_chars = {"prompt": "word " * (settings.max_prompt_chars // 5), "max_tokens": 1}

    def work() -> list[httpx.Response]:
        async def go() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=base_url, timeout=60) as c:
                return list(await asyncio.gather(*[c.post("/generate", json=b) for b in [near_body, at_chars] * 3]))

        return asyncio.run(go())

    slowest, probes, responses = _health_while(base_url, work)
    assert slowest < 1.0, f"/health took {slowest:.2f}s"
    for r in responses:
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "prompt"
    assert "characters" in responses[0].json()["error"]["message"]  # refused before tokenizing
    assert "tokens" in responses[1].json()["error"]["message"]  # tokenized (in a worker thread), then refused
    print(f"near-limit prompts: slowest /health {slowest * 1000:.0f} ms over {probes} probes")


# ---- 2. 400s that were 500s -------------------------------------------------------------------------

SURROGATE = "\\ud800"  # as it appears in the JSON text


@pytest.mark.parametrize(("path", "raw", "param"), [
    ("/generate", f'{{"messages": [{{"role": "user", "content": "a{SURROGATE}"}}]}}', "messages.0.content"),
    ("/generate", f'{{"prompt": "{SURROGATE}"}}', "prompt"),
    ("/generate", f'{{"prompt": "Hi", "stop": ["ok", "{SURROGATE}"]}}', "stop.1"),
    ("/generate", f'{{"prompt": "Hi", "steering": {{"interventions": [{{"method": "actadd", "positive": '
                  f'"{SURROGATE}", "negative": "b", "layer": 3}}]}}}}', "steering.interventions.0.positive"),
    ("/generate", f'{{"prompt": "Hi", "steering": {{"x{SURROGATE}": 1}}}}', "steering"),
    ("/v1/chat/completions", f'{{"messages": [{{"role": "user", "content": "{SURROGATE}"}}]}}', "messages.0.content"),
    ("/v1/chat/completions", f'{{"messages": [{{"role": "user", "content": [{{"type": "text", "text": '
                             f'"{SURROGATE}"}}]}}]}}', "messages.0.content.0.text"),
    ("/v1/chat/completions", f'{{"messages": [{{"role": "user", "content": "Hi"}}], "model": "{SURROGATE}"}}',
     "model"),
    ("/v1/completions", f'{{"prompt": ["{SURROGATE}"]}}', "prompt.0"),
    ("/v1/completions", f'{{"prompt": "Hi", "user": "{SURROGATE}"}}', "user"),
    ("/admin/vectors", f'{{"name": "{SURROGATE}", "vectors": {{"0": [1.0]}}}}', "name"),
    ("/admin/vectors", f'{{"name": "v", "description": "{SURROGATE}", "vectors": {{"0": [1.0]}}}}', "description"),
    ("/admin/vectors/compute", f'{{"name": "v", "positive": ["a", "{SURROGATE}"], "negative": ["b"]}}',
     "positive.1"),
    ("/admin/pairs", f'{{"name": "p", "positive": "a", "negative": "{SURROGATE}"}}', "negative"),
    ("/admin/vectors/v", f'{{"enabled": true, "x{SURROGATE}": 1}}', None),
])
async def test_lone_surrogates_are_400_naming_the_field(ac: httpx.AsyncClient, path: str, raw: str,
                                                        param: str | None) -> None:
    method = "PATCH" if path == "/admin/vectors/v" else "POST"
    r = await ac.request(method, path, content=raw, headers={**ADMIN, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert error(400, r.json(), param)["code"] == "invalid_unicode"


def test_renderer_refuses_lone_surrogates(service: Service) -> None:
    with pytest.raises(SteerError) as info:
        service.renderer.render(messages=[{"role": "user", "content": "a\ud800"}])
    assert info.value.field == "messages.0.content"
    assert service.renderer.render(prompt="smile \U0001f600").token_ids


@pytest.mark.parametrize("raw", ['{"name": "v", "vectors": {"0": [1.0]', "", "[1, 2]", '"text"', "nul\x00l",
                                 '{"name": "v", "vectors": {"0": [NaN]}}', b"\xff\xfe{}", "[" * 100_000],
                         ids=["truncated", "empty", "list", "string", "nul", "nan", "not utf-8", "deep"])
async def test_malformed_json_upload_is_400(ac: httpx.AsyncClient, raw: str | bytes) -> None:
    r = await ac.post("/admin/vectors", content=raw, headers={**ADMIN, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["type"] == "invalid_request_error"


def test_validation_error_without_a_location() -> None:
    """pydantic's own JSON parser reports no location; that is still a 400, not an IndexError."""
    r = validation_error([{"type": "json_invalid", "loc": (), "msg": "Invalid JSON", "ctx": {"error": "EOF"}}])
    assert r.status_code == 400
    assert json.loads(bytes(r.body))["error"]["code"] == "invalid_json"


# ---- 5. compute names the prompt --------------------------------------------------------------------


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize(("prompts", "param"), [
    ({"positive": ["a", "b", "c", "word " * 3000]}, "positive.3"),  # over the token limit
    ({"negative": ["a", "x" * (DEFAULT_MAX_PROMPT_CHARS + 1)]}, "negative.1"),  # over the character limit
    ({"positive": ["a", "   "]}, "positive.1"),  # blank
])
async def test_compute_names_the_offending_prompt(ac: httpx.AsyncClient, prompts: dict[str, list[str]], param: str,
                                                  chat: bool) -> None:
    body = {"name": "named", "positive": ["good"], "negative": ["bad"], "layers": [3], "chat": chat, **prompts}
    r = await ac.post("/admin/vectors/compute", json=body, headers=ADMIN)
    assert r.status_code == 400, r.text
    error(400, r.json(), param)


# ---- 4. constraints in the models: still a 400 naming the field -------------------------------------


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/admin/vectors/compute", {"name": "c", "positive": [], "negative": ["b"]}, "positive"),
    ("/admin/vectors/compute", {"name": "c", "positive": ["a", ""], "negative": ["b"]}, "positive.1"),
    ("/admin/vectors/compute", {"name": "c", "positive": ["a"], "negative": ["b"], "layers": [-1]}, "layers.0"),
    ("/admin/vectors/compute", {"name": "c", "positive": ["a"], "negative": ["b"], "layers": []}, "layers"),
    ("/admin/vectors/compute", {"name": "-c", "positive": ["a"], "negative": ["b"]}, "name"),
    ("/admin/vectors/compute", {"name": "c" * 65, "positive": ["a"], "negative": ["b"]}, "name"),
    ("/admin/pairs", {"name": "p", "positive": "a", "negative": "b", "layer": -1}, "layer"),
    ("/admin/pairs", {"name": "p", "positive": "a", "negative": "b", "description": "d" * 1025}, "description"),
    ("/admin/vectors", {"name": "v", "description": "d" * 1025, "vectors": {"0": [1.0]}}, "description"),
    ("/generate", {"prompt": "Hi", "temperature": 5.5}, "temperature"),
    ("/generate", {"prompt": "Hi", "top_p": 1.5}, "top_p"),
    ("/v1/chat/completions", {"messages": HI, "max_tokens": 0}, "max_tokens"),
])
async def test_model_constraints_are_400s(ac: httpx.AsyncClient, path: str, body: dict[str, Any], param: str) -> None:
    r = await ac.post(path, json=body, headers=ADMIN)
    assert r.status_code == 400, r.text
    error(400, r.json(), param)


async def test_bad_references_in_admin_paths_are_400(ac: httpx.AsyncClient) -> None:
    for method, path in (("GET", "/admin/vectors/-bad"), ("DELETE", "/admin/pairs/x@0"),
                         ("GET", "/admin/pairs/a b")):
        r = await ac.request(method, path, headers=ADMIN)
        assert r.status_code == 400, (path, r.text)
        error(400, r.json(), "name")
    r = await ac.delete("/admin/vectors/v", params={"version": 0}, headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"]["param"] == "version"



# ---- found by tests/test_schema_fuzz.py, outside the edge ---------------------------------------------


@pytest.mark.parametrize("sampling", [{"temperature": 1.0, "top_p": 5e-324}, {"temperature": 1e-45}],
                         ids=["tiny top_p", "tiny temperature"])
def test_tiny_but_valid_sampling_values(client: httpx.Client, sampling: dict[str, float]) -> None:
    r = client.post("/generate", json={"prompt": "Hi", "max_tokens": 1, "seed": 1, **sampling})
    assert r.status_code == 200, r.text


def _padded_upload(name: str, layers: dict[str, list[float]], size: int) -> bytes:
    """A JSON vector upload of about ``size`` bytes: the values padded apart with whitespace (valid JSON)."""
    count = sum(len(v) for v in layers.values())
    pad = " " * max(0, size // count - 24)
    body = ",".join(f'"{k}": [' + ",".join(f"{pad}{x!r}" for x in v) + "]" for k, v in layers.items())
    return ('{"name": "' + name + '", "vectors": {' + body + "}}").encode()


def test_a_60mb_json_upload_leaves_health_fast(base_url: str, service: Service) -> None:
    """60 MB JSON vector uploads (under the 64 MiB cap), streamed through the parser in a worker thread
    that hands the interpreter back to the event loop between chunks: /health stays under 100 ms throughout.
    One has a layer of ten million values: refused at value hidden+1, naming the layer. The other is the
    right shape (whitespace-padded to 60 MB): parsed and stored. (Before: 3-9 s stalls, 650 MB, then the
    refusal.)"""
    hidden = service.info.hidden_size
    wrong = b'{"name": "huge", "vectors": {"3": [' + b",".join([b"0.125"] * 10_000_000) + b"]}}"
    right = _padded_upload("padded", random_unit_vectors("padded", 4, hidden), 60 * MiB)
    for body, status in ((wrong, 400), (right, 201)):
        assert 55 * MiB < len(body) < 64 * MiB

        def send(body: bytes = body) -> httpx.Response:
            with httpx.Client(base_url=base_url, timeout=120) as c:
                return c.post("/admin/vectors", content=body, headers={**ADMIN, "Content-Type": "application/json"})

        started = time.perf_counter()
        slowest, probes, r = _health_while(base_url, send)
        print(f"{len(body) / MiB:.0f} MiB upload -> {r.status_code} in {time.perf_counter() - started:.1f} s; "
              f"slowest /health {slowest * 1000:.0f} ms over {probes} probes")
        assert r.status_code == status, r.text
        assert slowest < 0.1, f"/health took {slowest * 1000:.0f} ms"
        if status == 400:
            assert r.json()["error"]["param"] == "vectors.3" and f"more than {hidden}" in r.json()["error"]["message"]
