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
from steerserve.service import Service, build_service
from steerserve.tools.sae.cli import sae_bytes
from tests.browser import Page, find_chromium
from tests.conftest import ADMIN_KEY, serving
from tests.paths import models_dir
from tests.test_feature_search import DOG_ORDER, LABELS
from tests.test_sae import saelens_dir

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("STEERSERVE_TEST_ARTIFACTS") or REPO / "tests" / "artifacts")
PORT = int(os.environ.get("STEERSERVE_TEST_PORT", "0"))


@pytest.fixture(scope="module")
def hf_service(tmp_path_factory: pytest.TempPathFactory) -> tuple[Service, Settings]:
    vectors = tmp_path_factory.mktemp("playground-vectors")
    for name in ("joy", "east"):
        shutil.copy(REPO / "vectors" / f"{name}.safetensors", vectors)
    settings = Settings(engine="hf", home=tmp_path_factory.mktemp("playground-home"),
                        model=prepare_default_model(models_dir()), admin_key=ADMIN_KEY, max_batch=4,
                        max_tokens_cap=256, vectors_dir=vectors)
    return build_service(settings, log=lambda _msg: None), settings


@pytest.fixture(scope="module")
def hf_url(hf_service: tuple[Service, Settings]) -> Iterator[str]:
    with serving(create_app(*hf_service), PORT, 300) as url:
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


def test_page_has_the_feature_picker(hf_url: str) -> None:
    """The controls of the SAE feature picker and the routes they call (the browser test below drives them)."""
    text = httpx.get(f"{hf_url}/playground", timeout=30).text
    for control in ('id="sae"', 'id="feature-q"', 'id="feature-search"', 'id="feature-results"',
                    'id="feature-strength"', 'id="feature-mode"', '<option value="add">', '<option value="clamp">',
                    'id="feature-top"', 'id="feature-tokens"'):
        assert control in text, control
    assert '"/features/search?"' in text and '"/features", {method: "POST"' in text
    assert '"sae_feature": {method: "sae_feature", artifact: "sae"' in text


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


def _features(page: Page, box: str) -> list[str]:
    return page.evaluate(f"[...document.querySelectorAll('#{box} button.pick')].map((b) => b.dataset.feature)")


def _spec(page: Page) -> dict[str, Any]:
    spec: dict[str, Any] = json.loads(page.evaluate("document.getElementById('spec').textContent")
                                      .removeprefix("steering: "))
    return spec


def _click(page: Page, box: str, feature: int) -> None:
    page.evaluate(f"document.querySelector('#{box} button[data-feature=\"{feature}\"]').click(); true")


def test_feature_search_fills_a_sae_feature_spec(hf_url: str, hf_service: tuple[Service, Settings], page: Page,
                                                 tmp_path: Path) -> None:
    """The feature box: a labelled dictionary uploaded, the admin key lists it into the box, a search by label
    lists its features in rank order, clicks add them to a ``sae_feature`` spec at the chosen strength and
    mode, "Top features" lists ``POST /features``' top 3 at every prompt token, and the spec built by clicks
    steers a generation."""
    service, _ = hf_service
    data = sae_bytes(saelens_dir(tmp_path), None, service.info, labels=LABELS)
    r = httpx.post(f"{hf_url}/admin/vectors", headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                   files=[("name", (None, "pg-sae")), ("file", ("sae.safetensors", data))], timeout=120)
    assert r.status_code == 201, r.text
    page.goto(f"{hf_url}/playground")
    page.errors.clear()  # what the browser logged for the tests before (their refused requests)
    _set(page, {"key": ADMIN_KEY})
    page.wait_for("document.getElementById('sae').value === 'pg-sae'", timeout=30)  # the one sae, chosen
    assert page.evaluate("[...document.querySelectorAll('#saes option')].map((o) => o.value)") == ["pg-sae"]

    _set(page, {"feature-q": "dog"})
    page.evaluate("document.getElementById('feature-search').click(); true")
    page.wait_for("document.getElementById('feature-results').dataset.state === 'done'", timeout=30)
    assert _features(page, "feature-results") == [str(f) for f in DOG_ORDER]
    assert page.evaluate("document.querySelector('#feature-results button.pick').textContent") == "#5  dog"
    assert "7 of 10 labelled features of pg-sae@1 match" in page.evaluate(
        "document.getElementById('feature-note').textContent")

    _set(page, {"feature-strength": "6"})
    _click(page, "feature-results", 6)
    assert page.evaluate("document.getElementById('method').value") == "sae_feature"
    assert _spec(page) == {"interventions": [{"method": "sae_feature", "sae": "pg-sae", "features": {"6": 6},
                                              "mode": "add"}]}
    _set(page, {"feature-mode": "clamp", "feature-strength": "2"})
    assert _spec(page)["interventions"][0]["mode"] == "clamp"
    _click(page, "feature-results", 5)
    assert _spec(page) == {"interventions": [{"method": "sae_feature", "sae": "pg-sae", "features": {"6": 6, "5": 2},
                                              "mode": "clamp"}]}
    _set(page, {"feature-q": "nothing like it"})
    page.evaluate("document.getElementById('feature-search').click(); true")
    page.wait_for("document.getElementById('feature-results').dataset.state === 'done'", timeout=30)
    assert _features(page, "feature-results") == []
    assert page.errors == [], page.errors
    _set(page, {"sae": "no-such-sae", "feature-q": "dog"})
    page.evaluate("document.getElementById('feature-search').click(); true")
    page.wait_for("document.getElementById('feature-results').dataset.state === 'failed'", timeout=30)
    assert page.evaluate("document.getElementById('feature-note').textContent").startswith("404: sae: unknown sae")

    # Top features of the page's prompt: one row per prompt token, the route's own top 3 in each.
    _set(page, {"sae": "pg-sae", "feature-mode": "add"})
    page.evaluate("document.getElementById('feature-top').click(); true")
    page.wait_for("document.getElementById('feature-tokens').dataset.state === 'done'", timeout=120)
    rows = page.evaluate("[...document.querySelectorAll('#feature-tokens .tok')].map((row) => "
                         "[...row.querySelectorAll('button.pick')].map((b) => b.dataset.feature))")
    want = httpx.post(f"{hf_url}/features", json={"messages": [{"role": "user", "content": "Tell me about your day."}],
                                                  "sae": "pg-sae", "top_k": 3}, timeout=120).json()["tokens"]
    assert rows == [[str(f["id"]) for f in t["features"]] for t in want]
    page.screenshot(ARTIFACTS / "playground-features.png")

    # A spec built by clicks steers: feature 3 at 60 (test_sae: the text moves), 12 tokens.
    _set(page, {"feature-q": "third", "feature-strength": "60", "max_tokens": "12"})
    page.evaluate("document.getElementById('feature-search').click(); true")
    page.wait_for("document.getElementById('feature-results').dataset.state === 'done'", timeout=30)
    _set(page, {"extra": '{"features": {}, "mode": "add"}'})
    _click(page, "feature-results", 3)
    assert _spec(page) == {"interventions": [{"method": "sae_feature", "sae": "pg-sae", "features": {"3": 60},
                                              "mode": "add"}]}
    out = _run(page)
    assert out["plain"]["state"] == out["steered"]["state"] == "done", out
    assert out["steered"]["report"] == "applied: sae_feature pg-sae@1", out
    assert out["steered"]["text"] != out["plain"]["text"], out
    # the one error the browser logged: the 404 of the unknown dictionary, which the page showed
    assert [e for e in page.errors if "sae=no-such-sae" not in e] == [], page.errors
