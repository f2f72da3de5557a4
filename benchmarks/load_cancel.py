"""Load and cancellation checker against a running steerserve: many streaming clients, some cut off early.

    python benchmarks/load_cancel.py --base-url http://127.0.0.1:8000 --admin-key "$STEERSERVE_ADMIN_KEY"
    python benchmarks/load_cancel.py --base-url http://127.0.0.1:8123 --admin-key k --clients 20 --max-tokens 16

What it does, in order:

1. uploads ``--vectors`` random unit vectors (every layer) as ``loadvec-<i>`` through the admin API;
2. waits until the engine is idle, then records the engine state from ``/metrics`` (the
   ``steerserve_engine{what=...}`` gauges, the front end's bank gate included: ``gate_rows``,
   ``gate_requests``, ``gate_waiting``) and the text of two fixed
   greedy requests (temperature 0, ``--check-tokens`` tokens, one plain and one steered);
3. starts ``--clients`` streaming requests at once, alternating between ``/generate`` and
   ``/v1/chat/completions`` (both with ``stream: true``). Half of them (``--steered-fraction``) carry a
   steering spec of their own: ``add`` of one of the vectors on a random set of layers with a random
   coefficient, or (``--actadd-share`` of them) ``actadd`` with a prompt pair no other client uses.
   ``--seed-fraction`` of them sample at temperature 0.7 with a ``seed``, the rest are greedy.
   ``--cancel-fraction`` of them are cancelled: the stream is closed after a random delay (which may land
   while the request still waits in the queue) or after a random number of events;
4. reports completed / cancelled / failed (failed: a non-200 status, an error event, a stream without a
   finish reason or ``[DONE]``, a steered request whose stream reports no applied steering, a timeout or
   any other exception; the first few reasons are printed), and p50/p99 latency of the completed ones;
5. waits until ``running`` is back to 0 and checks that the pinned bank rows, the steered count and the
   gate gauges are what they were before the load (cancelled requests must give back what they held),
   and that the two fixed greedy requests still return the same text;
6. deletes the vectors it uploaded (``--keep-vectors`` keeps them).

``--overload`` runs the overload check instead (``benchmarks/overload.py``: the sustainable rate R, then
arrivals at 2 x R: accepted requests keep their latency, the rest get 429 with Retry-After, nothing leaks).

The exit status is 0 only if every check passed (2 for a usage or set-up problem). Hidden size and layer
count default to the default model's; pass ``--hidden-size``/``--num-layers`` for another model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

PROMPTS = (
    "Tell me about your weekend.",
    "Describe the weather today.",
    "Explain how a bicycle works.",
    "Give me a recipe for pancakes.",
    "Why is the sky blue?",
    "Write a short poem about autumn.",
    "What should I pack for a hike?",
    "Give me three facts about octopuses.",
)
CHECK_PROMPT = "Write one sentence about the sea."
# Engine gauges that must come back to their value before the load. ``cached_rows`` is left out on
# purpose: the bank keeps unpinned vectors cached (LRU) after their requests end.
SETTLED_ENGINE_KEYS = ("running", "steered", "pinned_rows", "capacity", "gate_rows", "gate_requests", "gate_waiting",
                       "restarts")
VECTOR_PREFIX = "loadvec-"


class SetupError(Exception):
    """The run cannot start (no server, refused upload): exit status 2, not a load failure."""


@dataclass
class ClientPlan:
    """What one client sends and when it gives up."""

    index: int
    endpoint: str  # "/generate" or "/v1/chat/completions"
    body: dict[str, Any]
    steered: bool
    cancel_after_s: float | None = None  # close the stream this long after sending
    cancel_after_events: int | None = None  # or after this many data events


@dataclass
class ClientResult:
    plan: ClientPlan
    outcome: str = "failed"  # "completed" | "cancelled" | "failed"
    reason: str = ""
    latency_s: float = 0.0
    first_event_s: float | None = None
    events: int = 0


@dataclass
class Report:
    failures: list[str] = field(default_factory=list)

    def check(self, ok: bool, what: str) -> None:
        print(f"  [{'ok' if ok else 'FAIL'}] {what}")
        if not ok:
            self.failures.append(what)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--admin-key", default=os.environ.get("STEERSERVE_ADMIN_KEY"),
                   help="admin key, to upload the vectors (default: $STEERSERVE_ADMIN_KEY); without one, steered "
                        "clients use actadd only")
    p.add_argument("--clients", type=int, default=200, help="concurrent streaming clients (default: 200)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens of each load request (default: 32)")
    p.add_argument("--steered-fraction", type=float, default=0.5, help="clients with a spec of their own")
    p.add_argument("--actadd-share", type=float, default=0.25,
                   help="share of the steered clients that use actadd instead of add (default: 0.25)")
    p.add_argument("--seed-fraction", type=float, default=0.2, help="clients sampling at 0.7 with a seed")
    p.add_argument("--cancel-fraction", type=float, default=0.3, help="clients that close their stream early")
    p.add_argument("--cancel-max-delay", type=float, default=5.0,
                   help="a time-based cancel lands uniformly in [0.05, this] seconds (default: 5)")
    p.add_argument("--vectors", type=int, default=16, help="random unit vectors to upload (default: 16)")
    p.add_argument("--hidden-size", type=int, default=576, help="the served model's (default model: 576)")
    p.add_argument("--num-layers", type=int, default=30, help="the served model's (default model: 30)")
    p.add_argument("--check-tokens", type=int, default=32, help="max_tokens of the fixed greedy check")
    p.add_argument("--timeout", type=float, default=900.0, help="per-request limit in seconds (default: 900)")
    p.add_argument("--settle-timeout", type=float, default=120.0,
                   help="how long to wait for running to return to 0 (default: 120)")
    p.add_argument("--show-failures", type=int, default=5, help="failure reasons to print (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    p.add_argument("--keep-vectors", action="store_true", help="leave the uploaded vectors in the store")
    args = p.parse_args(argv)
    for name in ("steered_fraction", "actadd_share", "seed_fraction", "cancel_fraction"):
        if not 0.0 <= getattr(args, name) <= 1.0:
            p.error(f"--{name.replace('_', '-')} must be within [0, 1]")
    if args.clients < 1 or args.max_tokens < 1 or args.check_tokens < 1:
        p.error("--clients, --max-tokens and --check-tokens must be at least 1")
    return args


# ---- set-up: vectors -------------------------------------------------------------------------------------


def unit_vector(rng: random.Random, hidden: int) -> list[float]:
    v = [rng.gauss(0.0, 1.0) for _ in range(hidden)]
    norm = sum(x * x for x in v) ** 0.5
    return [x / norm for x in v]


async def upload_vectors(client: httpx.AsyncClient, args: argparse.Namespace, rng: random.Random) -> list[str]:
    """Upload ``--vectors`` vectors; returns their exact refs (``name@v``: reruns add versions)."""
    headers = {"Authorization": f"Bearer {args.admin_key}"}
    refs = []
    for i in range(args.vectors):
        vectors = {str(layer): unit_vector(rng, args.hidden_size) for layer in range(args.num_layers)}
        r = await client.post("/admin/vectors", headers=headers,
                              json={"name": f"{VECTOR_PREFIX}{i}", "vectors": vectors,
                                    "description": "benchmarks/load_cancel.py"})
        if r.status_code != 201:
            raise SetupError(f"uploading {VECTOR_PREFIX}{i} failed: {r.status_code} {r.text[:300]}")
        refs.append(r.json()["ref"])
    return refs


async def delete_vectors(client: httpx.AsyncClient, args: argparse.Namespace, refs: list[str]) -> None:
    headers = {"Authorization": f"Bearer {args.admin_key}"}
    for ref in refs:
        r = await client.delete(f"/admin/vectors/{ref}", headers=headers)
        if r.status_code != 200:
            print(f"  (could not delete {ref}: {r.status_code} {r.text[:200]})")


# ---- engine state ----------------------------------------------------------------------------------------


async def engine_state(client: httpx.AsyncClient) -> dict[str, float]:
    """``engine.<what>`` for each ``steerserve_engine`` gauge."""
    r = await client.get("/metrics")
    r.raise_for_status()
    state: dict[str, float] = {}
    for family in text_string_to_metric_families(r.text):
        if family.name == "steerserve_engine":
            for s in family.samples:
                state[f"engine.{s.labels.get('what', '?')}"] = s.value
    return state


async def wait_idle(client: httpx.AsyncClient, timeout: float) -> tuple[dict[str, float], float]:
    """Poll ``/metrics`` until ``running`` is 0 or ``timeout`` passes; returns the last state and the wait."""
    t0 = time.monotonic()
    while True:
        state = await engine_state(client)
        waited = time.monotonic() - t0
        if state.get("engine.running", 0.0) == 0.0 or waited >= timeout:
            return state, waited
        await asyncio.sleep(0.5)


def settled_keys(state: dict[str, float]) -> list[str]:
    """The gauges that must be back to their pre-load value once the engine is idle."""
    engine = [f"engine.{k}" for k in SETTLED_ENGINE_KEYS if f"engine.{k}" in state]
    return engine + sorted(k for k in state if not k.startswith("engine."))


def show_state(label: str, state: dict[str, float]) -> None:
    shown = ", ".join(f"{k.removeprefix('engine.')}={v:g}" for k, v in state.items())
    print(f"{label}: {shown or '(no engine gauges)'}")


# ---- fixed greedy check --------------------------------------------------------------------------------


async def greedy_texts(client: httpx.AsyncClient, args: argparse.Namespace, refs: list[str]) -> dict[str, str]:
    """The texts of a fixed plain and a fixed steered greedy request (unchanged by load if nothing leaks)."""
    specs: dict[str, dict[str, Any] | None] = {"plain": None}
    if refs:
        specs["steered"] = {"interventions": [{"method": "add", "vector": refs[0], "coeff": 4}]}
    out = {}
    for label, steering in specs.items():
        body: dict[str, Any] = {"messages": [{"role": "user", "content": CHECK_PROMPT}], "temperature": 0,
                                "max_tokens": args.check_tokens}
        if steering is not None:
            body["steering"] = steering
        r = await client.post("/generate", json=body, timeout=args.timeout)
        out[label] = r.json()["text"] if r.status_code == 200 else f"<HTTP {r.status_code}: {r.text[:200]}>"
    return out


# ---- the load --------------------------------------------------------------------------------------------


def plan_clients(args: argparse.Namespace, rng: random.Random, refs: list[str]) -> list[ClientPlan]:
    n = args.clients
    # Exact shares (not a coin per client), shuffled independently, so small runs still mix every kind.
    steered = set(rng.sample(range(n), round(n * args.steered_fraction)))
    seeded = set(rng.sample(range(n), round(n * args.seed_fraction)))
    cancelled = set(rng.sample(range(n), round(n * args.cancel_fraction)))
    steered_order = sorted(steered)
    actadd = set(rng.sample(steered_order, round(len(steered_order) * args.actadd_share))) if refs else steered
    plans = []
    for i in range(n):
        endpoint = "/generate" if i % 2 == 0 else "/v1/chat/completions"
        body: dict[str, Any] = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                                "max_tokens": args.max_tokens, "stream": True, "temperature": 0}
        if i in seeded:
            body.update(temperature=0.7, seed=rng.randrange(2**31))
        if i in actadd:
            # A pair no other client uses: its difference vector is computed and pinned for this request only.
            body["steering"] = {"interventions": [{"method": "actadd", "positive": f"Love and joy, case {i}",
                                                   "negative": f"Hate and anger, case {i}",
                                                   "layer": rng.randrange(args.num_layers), "coeff": 4}]}
        elif i in steered:
            layers = sorted(rng.sample(range(args.num_layers), rng.randint(1, 4)))
            coeff = round(rng.uniform(2.0, 6.0), 3)  # with the layers, makes the spec this client's own
            body["steering"] = {"interventions": [{"method": "add", "vector": rng.choice(refs), "coeff": coeff,
                                                   "layers": layers}]}
        plan = ClientPlan(i, endpoint, body, steered=i in steered)
        if i in cancelled:
            if rng.random() < 0.5:
                plan.cancel_after_s = rng.uniform(0.05, args.cancel_max_delay)
            else:
                plan.cancel_after_events = rng.randint(1, max(1, args.max_tokens // 2))
        plans.append(plan)
    return plans


def event_error(event: dict[str, Any]) -> str | None:
    err = event.get("error")
    if err is None:
        return None
    return f"error event: {err.get('message', err) if isinstance(err, dict) else err}"


def event_finish(endpoint: str, event: dict[str, Any]) -> str | None:
    if endpoint == "/generate":
        return event.get("finish_reason")
    choices = event.get("choices") or []
    return choices[0].get("finish_reason") if choices else None


async def run_client(client: httpx.AsyncClient, plan: ClientPlan, start: asyncio.Event,
                     timeout: float) -> ClientResult:
    res = ClientResult(plan)
    await start.wait()
    t0 = time.monotonic()
    finish: str | None = None
    done = applied = False

    async def consume() -> None:
        nonlocal finish, done, applied
        async with client.stream("POST", plan.endpoint, json=plan.body) as r:
            if r.status_code != 200:
                body = (await r.aread()).decode(errors="replace")
                res.reason = f"HTTP {r.status_code}: {body[:200]}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    return
                event = json.loads(data)
                res.events += 1
                if res.first_event_s is None:
                    res.first_event_s = time.monotonic() - t0
                if (err := event_error(event)) is not None:
                    res.reason = err
                    return
                if (event.get("steering") or {}).get("applied"):
                    applied = True
                finish = event_finish(plan.endpoint, event) or finish
                # A cancel point at or past the finishing event would cancel nothing: let it complete.
                if plan.cancel_after_events is not None and res.events >= plan.cancel_after_events and not finish:
                    res.outcome = "cancelled"  # leaving the block closes the stream mid-response
                    return

    try:
        limit = timeout if plan.cancel_after_s is None else min(timeout, plan.cancel_after_s)
        await asyncio.wait_for(consume(), limit)
    except asyncio.TimeoutError:
        if plan.cancel_after_s is not None and plan.cancel_after_s < timeout:
            res.outcome = "cancelled"  # wait_for cancelled consume(), which closed the stream
        else:
            res.reason = f"no end after {timeout:.0f} s"
    except Exception as exc:  # any transport or parsing problem is a failure of this client, reported as such
        res.reason = f"{type(exc).__name__}: {exc}"
    res.latency_s = time.monotonic() - t0
    if res.outcome == "cancelled" or res.reason:
        return res
    if not done:
        res.reason = "stream ended without [DONE]"
    elif finish is None:
        res.reason = "no finish_reason in the stream"
    elif plan.steered and not applied:
        res.reason = "steered request's stream reports no applied steering"
    else:
        res.outcome = "completed"
    return res


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (``q`` in [0, 100]) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


async def run_load(client: httpx.AsyncClient, plans: list[ClientPlan], timeout: float) -> list[ClientResult]:
    start = asyncio.Event()  # every client is connected-ready before any sends: a real burst
    tasks = [asyncio.create_task(run_client(client, plan, start, timeout)) for plan in plans]
    await asyncio.sleep(0)
    start.set()
    return list(await asyncio.gather(*tasks))


def summarise(results: list[ClientResult], wall_s: float, show: int, report: Report) -> None:
    by = {k: [r for r in results if r.outcome == k] for k in ("completed", "cancelled", "failed")}
    print(f"\nload: {len(results)} clients in {wall_s:.1f} s: completed {len(by['completed'])}, "
          f"cancelled {len(by['cancelled'])}, failed {len(by['failed'])}")
    for endpoint in ("/generate", "/v1/chat/completions"):
        mine = [r for r in results if r.plan.endpoint == endpoint]
        counts = ", ".join(f"{k} {sum(r.outcome == k for r in mine)}" for k in by)
        print(f"  {endpoint}: {len(mine)} clients ({counts})")
    done = by["completed"]
    if done:
        lat = [r.latency_s for r in done]
        ttfe = [r.first_event_s for r in done if r.first_event_s is not None]
        print(f"  completed latency: p50 {percentile(lat, 50):.2f} s, p99 {percentile(lat, 99):.2f} s"
              + (f"; first event p50 {percentile(ttfe, 50):.2f} s, p99 {percentile(ttfe, 99):.2f} s" if ttfe else ""))
    planned_cancels = sum(r.plan.cancel_after_s is not None or r.plan.cancel_after_events is not None
                          for r in results)
    late = sum(r.outcome == "completed" and (r.plan.cancel_after_s is not None or r.plan.cancel_after_events
                                             is not None) for r in results)
    print(f"  cancels planned {planned_cancels}, of which {late} finished before their cancel point")
    for r in by["failed"][:show]:
        print(f"  failure: client {r.plan.index} {r.plan.endpoint}: {r.reason}")
    report.check(not by["failed"], f"no failed client ({len(by['failed'])} failed)")
    report.check(bool(done) or not results, "some clients completed")


async def main_async(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    report = Report()
    clients_limit = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=32)
    timeout = httpx.Timeout(args.timeout, connect=30.0)
    async with httpx.AsyncClient(base_url=args.base_url, timeout=timeout, limits=clients_limit) as client:
        try:
            health = await client.get("/health")
        except httpx.TransportError as exc:
            print(f"load_cancel: no server at {args.base_url}: {exc}", file=sys.stderr)
            return 2
        if health.status_code != 200:
            print(f"load_cancel: {args.base_url}/health answered {health.status_code}", file=sys.stderr)
            return 2
        refs: list[str] = []
        if args.admin_key:
            try:
                refs = await upload_vectors(client, args, rng)
            except SetupError as exc:
                print(f"load_cancel: {exc}", file=sys.stderr)
                return 2
            print(f"uploaded {len(refs)} vectors: {refs[0]} .. {refs[-1]}" if refs else "uploaded no vectors")
        else:
            print("no admin key: steered clients use actadd only")
        try:
            before, waited = await wait_idle(client, args.settle_timeout)
            if before.get("engine.running", 0.0):
                print(f"warning: the engine was still busy after {waited:.0f} s; 'before' is not a baseline")
            texts_before = await greedy_texts(client, args, refs)
            before = await engine_state(client)  # again: the greedy checks may have cached rows

            plans = plan_clients(args, rng, refs)
            t0 = time.monotonic()
            results = await run_load(client, plans, args.timeout)
            wall = time.monotonic() - t0
            summarise(results, wall, args.show_failures, report)

            after, waited = await wait_idle(client, args.settle_timeout)
            print(f"\nengine idle {waited:.1f} s after the load")
            show_state("engine before", before)
            show_state("engine after ", after)
            report.check(after.get("engine.running", 0.0) == 0.0,
                         f"running back to 0 within {args.settle_timeout:.0f} s")
            for key in settled_keys(before):
                report.check(after.get(key) == before[key],
                             f"{key.removeprefix('engine.')} after == before ({after.get(key)} vs {before[key]})")
            texts_after = await greedy_texts(client, args, refs)
            for label, text in texts_before.items():
                same = texts_after.get(label) == text
                report.check(same, f"fixed greedy request ({label}) returns the same text after the load")
                if not same:
                    print(f"    before: {text!r}\n    after:  {texts_after.get(label)!r}")
        finally:
            if refs and not args.keep_vectors:
                await delete_vectors(client, args, refs)
    print(f"\n{'PASS' if not report.failures else 'FAIL'}: {len(report.failures)} check(s) failed")
    return 0 if not report.failures else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--overload" in args:  # the overload run (``benchmarks/overload.py``), with its own options
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import overload

        return overload.main([a for a in args if a != "--overload"])
    return asyncio.run(main_async(parse_args(args)))


if __name__ == "__main__":
    sys.exit(main())
