"""``GET /playground``: one static page (HTML, CSS and vanilla JS in one file, no build step, no network)
for trying steering by hand: it sends the same prompt unsteered and steered to ``POST /generate`` with
``"stream": true`` and shows both continuations side by side as they stream, with a closed loop's
per-token figures (``loop`` in the stream) drawn as a small chart. Its SAE box finds a dictionary's features
by label (``GET /features/search``) or lists the prompt's most active ones per token (``POST /features``);
clicking one adds it to a ``sae_feature`` spec at the strength and mode chosen there.

The page holds no secret and reads nothing the public routes do not: the artifact list comes from
``GET /admin/vectors`` and ``GET /admin/pairs`` only with a key the user types in. It is left out of the
OpenAPI document (a page, not an API).
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter()


@cache
def page() -> str:
    """The page's text, shipped as package data (``steerserve/api/static/playground.html``)."""
    return resources.files("steerserve.api").joinpath("static", "playground.html").read_text(encoding="utf-8")


@router.get("/playground", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    # no-store: an upgraded server's page is never mixed with a cached older one's script
    return HTMLResponse(page(), headers={"Cache-Control": "no-store"})
