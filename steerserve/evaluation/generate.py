"""Generation over the native HTTP API (``POST /generate``), against a running server or the in-process app.

Both modes share this code: a server is reached at its URL, the in-process service through its FastAPI app
over ``httpx.ASGITransport``. Requests run concurrently (``concurrency`` in flight) so that the engine
batches them.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from tqdm import tqdm

from steerserve.concurrency import gather_all
from steerserve.errors import SteerError
from steerserve.evaluation.data import Sample
from steerserve.evaluation.sweep import PLACEHOLDER, apply_template

R = TypeVar("R")
One = Callable[[httpx.AsyncClient, dict[str, Any]], Awaitable[R]]  # one request's reply


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 64
    temperature: float = 0.0  # greedy: the baseline and the steered runs differ by the steering alone
    seed: int = 0
    chat: bool = True  # send a one-message chat (the model's template), else the raw prompt text
    template: str = PLACEHOLDER  # each data item goes into it (--prompt-template), e.g. "{prompt}\nBe brief."


@dataclass(frozen=True)
class Reply:
    text: str
    completion_tokens: int
    finish_reason: str
    report: Mapping[str, float] = field(default_factory=dict)  # numeric fields of steering.report, if any
    model: str = ""  # the model the server says it served


def prompt_text(sample: Sample, sampling: Sampling, template: str | None = None) -> str:
    """What is sent for ``sample``: the data item in ``template`` (a setting's own) or ``sampling.template``."""
    return apply_template(template if template is not None else sampling.template, sample.prompt)


def body(sample: Sample, steering: Mapping[str, Any] | None, sampling: Sampling,
         template: str | None = None, temperature: float | None = None) -> dict[str, Any]:
    """The ``POST /generate`` body for one sample (``template``, ``temperature``: the setting's own, if any)."""
    out: dict[str, Any] = {"max_tokens": sampling.max_tokens, "seed": sampling.seed + sample.draw,
                           "temperature": sampling.temperature if temperature is None else temperature}
    text = prompt_text(sample, sampling, template)
    if sampling.chat:
        out["messages"] = [{"role": "user", "content": text}]
    else:
        out["prompt"] = text
    if steering is not None:
        out["steering"] = steering
    return out


def numeric_report(report: Any) -> dict[str, float]:
    """The finite numbers in a closed-loop ``steering.report`` (e.g. mean entropy, final gain)."""
    if not isinstance(report, Mapping):
        return {}
    return {str(k): float(v) for k, v in report.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}


def error_detail(r: httpx.Response) -> str:
    """An error answer's message (it names the field itself: ``api.app``'s error shape), else its text."""
    try:
        return str(r.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return r.text[:500]


async def _one(client: httpx.AsyncClient, payload: dict[str, Any]) -> Reply:
    r = await client.post("/generate", json=payload)
    if r.status_code != 200:
        raise SteerError(f"the server answered {r.status_code}: {error_detail(r)}", status=r.status_code)
    data = r.json()
    steering = data.get("steering") or {}
    return Reply(str(data["text"]), int(data["usage"]["completion_tokens"]), str(data["finish_reason"]),
                 numeric_report(steering.get("report")), str(data.get("model", "")))


async def generate_all(client: httpx.AsyncClient, payloads: Sequence[dict[str, Any]], concurrency: int,
                       progress: bool = True) -> list[Reply]:
    """Every payload's ``POST /generate`` reply, in order; the first failure cancels the rest and is raised."""
    return await generate_each(client, payloads, concurrency, progress, _one)


async def generate_each(client: httpx.AsyncClient, payloads: Sequence[dict[str, Any]], concurrency: int,
                        progress: bool, one: One[R]) -> list[R]:
    """``one(client, payload)`` for every payload, ``concurrency`` in flight, in order; the first failure
    cancels the rest and is raised."""
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(payloads), desc="generate", unit="req", disable=not progress, mininterval=1.0)

    async def run(payload: dict[str, Any]) -> R:
        async with gate:
            reply = await one(client, payload)
        bar.update(1)
        return reply

    try:
        return await gather_all(run(p) for p in payloads)
    finally:
        bar.close()
