"""``GET /playground`` in a real headless Chromium (``tests.browser``) against a live hf-engine server on the
default model with the shipped ``joy`` and ``east`` vectors: the page loads without console errors, an
unsteered and a steered generation stream side by side and differ, a closed loop's per-token figures are
drawn, and a screenshot of each run is written to ``$STEERSERVE_TEST_ARTIFACTS`` (default
``tests/artifacts/``).

The server is this module's own (the session's live server may run the vllm engine, which does not stream
the per-token figures, and has no shipped vectors). ``$STEERSERVE_TEST_PORT`` pins its port (and the
browser's debugging port, one above) where a machine hands out port ranges; by default both are free ports.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from steerserve.api import create_app
from steerserve.config import Settings
from steerserve.model import prepare_default_model
from steerserve.service import build_service
from tests.browser import Page, find_chromium
from tests.conftest import ADMIN_KEY, serving
from tests.paths import models_dir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("STEERSERVE_TEST_ARTIFACTS") or REPO / "tests" / "artifacts")
PORT = int(os.environ.get("STEERSERVE_TEST_PORT", "0"))


@pytest.fixture(scope="module")
def hf_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    vectors = tmp_path_factory.mktemp("playground-vectors")
    for name in ("joy", "east"):
        shutil.copy(REPO / "vectors" / f"{name}.safetensors", vectors)
    settings = Settings(engine="hf", home=tmp_path_factory.mktemp("playground-home"),
                        model=prepare_default_model(models_dir()), admin_key=ADMIN_KEY, max_batch=4,
                        max_tokens_cap=256, vectors_dir=vectors)
    with serving(create_app(build_service(settings, log=lambda _msg: None), settings), PORT, 300) as url:
        yield url


@pytest.fixture(scope="module")
def page() -> Iterator[Page]:
    binary, why = find_chromium()
    if binary is None:
        pytest.skip(why)
    p = Page(binary, port=PORT + 1 if PORT else 0)
    try:
        yield p
    finally:
        p.close()


def test_page_is_served_as_package_data(hf_url: str) -> None:
    r = httpx.get(f"{hf_url}/playground", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<title>steerserve playground</title>" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # nothing fetched from elsewhere
    assert "/playground" not in httpx.get(f"{hf_url}/openapi.json", timeout=30).json()["paths"]


def test_closed_loop_streams_per_token_figures(hf_url: str) -> None:
    """What the page's chart draws: on the hf engine every increment of a closed-loop stream, the last one
    included, carries the loop's entropy and gain; the gain stays in the loop's bounds and ends where the
    report says. An open-loop request's increments carry none."""
    def events(steering: dict[str, Any]) -> list[dict[str, Any]]:
        body = {"messages": [{"role": "user", "content": "Tell me about your day."}], "max_tokens": 24,
                "temperature": 0, "stream": True, "steering": steering}
        with httpx.stream("POST", f"{hf_url}/generate", json=body, timeout=300) as r:
            assert r.status_code == 200
            lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        return [json.loads(x) for x in lines[:-1]]

    out = events({"interventions": [{"method": "entropic", "vector": "east", "target_entropy": 6}]})
    figures = [e["loop"] for e in out]
    final = out[-1]
    assert final["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 24
    assert len(figures) == 24 == final["steering"]["report"]["loop_steps"]
    assert all(-1 <= f["gain"] <= 1 and 0 <= f["entropy_bits"] < 16 for f in figures), figures
    assert figures[-1]["gain"] == final["steering"]["report"]["final_gain"]
    mean = sum(f["entropy_bits"] for f in figures) / len(figures)
    assert abs(mean - final["steering"]["report"]["mean_entropy_bits"]) < 1e-3
    assert len({f["gain"] for f in figures}) > 1  # the gain moves: the figures are per token, not one repeated
    plain = events({"interventions": [{"method": "entropic", "vector": "east", "beta": 0.25}]})
    assert not any("loop" in e for e in plain) and "".join(e["text"] for e in plain)


def test_closed_loop_figures_stream_on_the_serving_engine(base_url: str, fresh_vector: Any, service: Any) -> None:
    """The same figures on the session's engine (vllm in the main run): a closed loop's increments carry its
    entropy and gain (on vllm as of the latest step, fetched for all loops in one worker round trip at most
    every 0.25 s, so not every increment has them), inside the loop's bounds; an open loop's carry none."""
    fresh_vector("loop-figures")

    def events(steering: dict[str, Any]) -> list[dict[str, Any]]:
        body = {"messages": [{"role": "user", "content": "Tell me about your day."}], "max_tokens": 64,
                "ignore_eos": True, "temperature": 0, "stream": True, "steering": steering}
        with httpx.stream("POST", f"{base_url}/generate", json=body, timeout=300) as r:
            assert r.status_code == 200
            lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        return [json.loads(x) for x in lines[:-1]]

    closed = {"method": "entropic", "vector": "loop-figures", "layer": 10, "target_entropy": 6}
    out = events({"interventions": [closed]})
    figures = [e["loop"] for e in out if "loop" in e]
    assert len(figures) >= 2, (service.settings.engine, out[:3])
    assert all(-1 <= f["gain"] <= 1 and 0 <= f["entropy_bits"] < 16 for f in figures), figures
    assert out[-1]["steering"]["report"]["loop_steps"] == 64
    plain = events({"interventions": [{"method": "entropic", "vector": "loop-figures", "layer": 10, "beta": 0.25}]})
    assert not any("loop" in e for e in plain)


# Counts each pane's text changes while it streams: a reply that arrived in one piece would count 1.
WATCH = """window.changes = {plain: 0, steered: 0};
for (const k of ["plain", "steered"]) new MutationObserver(() => window.changes[k]++).observe(
  document.querySelector("#pane-" + k + " .out"), {childList: true, characterData: true, subtree: true});"""


def _set(page: Page, fields: dict[str, str]) -> None:
    for key, value in fields.items():
        page.evaluate(f"(() => {{ const e = document.getElementById({json.dumps(key)}); e.value = {json.dumps(value)};"
                      " e.dispatchEvent(new Event(e.tagName === 'SELECT' || e.id === 'key' ? 'change' : 'input'));"
                      " return true; })()")


def _run(page: Page) -> dict[str, dict[str, Any]]:
    """Click Generate, wait for both panes to finish; each pane's text, status, report and chart."""
    page.evaluate(WATCH + "document.getElementById('go').click(); true")
    page.wait_for("document.body.dataset.state === 'done'", timeout=300)
    return page.evaluate("""Object.fromEntries(["plain", "steered"].map((k) => {
      const p = document.getElementById("pane-" + k);
      return [k, {state: p.dataset.state, text: p.querySelector(".out").textContent,
                  stat: p.querySelector(".stat").textContent, report: p.querySelector(".report").textContent,
                  points: (p.querySelector(".chart polyline") || {getAttribute: () => ""}).getAttribute("points"),
                  changes: window.changes[k]}];
    }))""")


def test_playground_streams_unsteered_and_steered_side_by_side(hf_url: str, page: Page) -> None:
    page.goto(f"{hf_url}/playground")
    page.wait_for("document.getElementById('model').textContent.includes('SmolLM2')", timeout=30)
    assert page.errors == []

    # The admin key lists the artifacts into the drop-down; the method's kinds filter it.
    _set(page, {"key": ADMIN_KEY})
    page.wait_for("[...document.querySelectorAll('#artifacts option')].some((o) => o.value === 'joy')", timeout=30)

    # add joy at 1.5 on layers 4-8 (the page's defaults for add), greedy, 40 tokens.
    assert page.evaluate("document.getElementById('method').value") == "add"
    _set(page, {"artifact": "joy", "strength": "1.5", "extra": '{"layers": [4, 5, 6, 7, 8]}'})
    assert json.loads(page.evaluate("document.getElementById('spec').textContent").removeprefix("steering: ")) == {
        "interventions": [{"method": "add", "vector": "joy", "coeff": 1.5, "layers": [4, 5, 6, 7, 8]}]}
    out = _run(page)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(ARTIFACTS / "playground-add.png")
    plain, steered = out["plain"], out["steered"]
    assert plain["state"] == steered["state"] == "done", out
    assert len(plain["text"]) > 40 and len(steered["text"]) > 40, out
    assert plain["text"] != steered["text"]
    assert plain["changes"] > 10 and steered["changes"] > 10, out  # streamed token by token, not in one piece
    assert "40 tokens" in plain["stat"] and "40 tokens" in steered["stat"], out
    assert plain["report"] == "no steering" and steered["report"] == "applied: add joy@1", out
    assert not steered["points"]  # add has no per-token figures

    # A closed loop: the per-token entropy and gain are drawn, one point per token and series.
    _set(page, {"method": "entropic (closed loop)"})
    _set(page, {"artifact": "east", "strength": "6"})
    out = _run(page)
    page.screenshot(ARTIFACTS / "playground-closed-loop.png")
    steered = out["steered"]
    assert steered["state"] == "done" and steered["text"] and steered["text"] != out["plain"]["text"], out
    assert len(steered["points"].split()) == 40, out
    assert "loop_steps 40" in steered["report"] and "final_gain" in steered["report"], out
    assert page.errors == [], page.errors

    # A refused request says why in its own pane (the field the server named); the other pane is unaffected.
    _set(page, {"artifact": "no-such-vector"})
    out = _run(page)
    assert out["plain"]["state"] == "done" and out["steered"]["state"] == "failed", out
    assert out["steered"]["text"] == "400: steering.interventions.0.vector: unknown vector 'no-such-vector'", out
    assert out["steered"]["stat"] == "failed", out
