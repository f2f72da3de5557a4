"""Overload run against a running steerserve: does it refuse, rather than queue, what it cannot serve in time?

    STEERSERVE_MAX_PENDING=16 ./deploy/serve.sh &   # the bound under test
    python benchmarks/overload.py --base-url http://127.0.0.1:8000 --seconds 60
    python benchmarks/load_cancel.py --overload ...  # the same, from the load checker

1. **Sustainable rate**: ``--clients`` closed-loop clients (each sends its next request when the last one
   finished) for ``--seconds``: throughput R (requests/s) and the latency of requests at that load.
2. **Baseline**: open-loop arrivals at ``--baseline-load`` x R (default 0.8): latency p50/p99 when nothing is
   refused.
3. **Overload**: open-loop arrivals at ``--factor`` x R (default 2) for ``--seconds``: accepted requests'
   latency p50/p99 beside the baseline's (the ratio is printed), how many got 429 and whether each had
   ``Retry-After``, and anything else (failures).
4. **Nothing leaks**: once idle, ``pending_requests`` and ``running`` in ``/metrics`` are 0.

Every request is a greedy ``/generate`` of ``--max-tokens`` tokens with ``ignore_eos`` (equal work each).
Exit status 0 only if no request failed, every 429 had Retry-After and nothing leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    refused: int = 0
    refused_without_retry_after: int = 0
    failed: list[str] = field(default_factory=list)

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q / 100 * len(xs)))] if xs else float("nan")

    def show(self) -> None:
        print(f"{self.name:>10}: accepted {len(self.latencies):4d}, latency p50 {self.pct(50):6.2f} s, "
              f"p99 {self.pct(99):6.2f} s; 429 {self.refused} (without Retry-After {self.refused_without_retry_after})"
              f"; failed {len(self.failed)}")


def body(args: argparse.Namespace, i: int) -> dict[str, object]:
    return {"prompt": f"Request {i}: write about the sea.", "max_tokens": args.max_tokens, "temperature": 0,
            "ignore_eos": True}


async def one(client: httpx.AsyncClient, args: argparse.Namespace, i: int, phase: Phase) -> None:
    start = time.monotonic()
    try:
        r = await client.post("/generate", json=body(args, i))
    except Exception as exc:  # a dropped connection or a timeout is a failure of the server's promise
        phase.failed.append(f"{type(exc).__name__}: {exc}")
        return
    if r.status_code == 200:
        phase.latencies.append(time.monotonic() - start)
    elif r.status_code == 429:
        phase.refused += 1
        phase.refused_without_retry_after += "retry-after" not in r.headers
    else:
        phase.failed.append(f"{r.status_code}: {r.text[:200]}")


async def closed_loop(client: httpx.AsyncClient, args: argparse.Namespace) -> tuple[float, Phase]:
    phase, deadline, counter = Phase("saturated"), time.monotonic() + args.seconds, iter(range(10**9))

    async def worker() -> None:
        while time.monotonic() < deadline:
            await one(client, args, next(counter), phase)

    t0 = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(args.clients)))
    return len(phase.latencies) / (time.monotonic() - t0), phase


async def open_loop(client: httpx.AsyncClient, args: argparse.Namespace, rate: float, name: str) -> Phase:
    """Arrivals every 1/rate seconds for ``--seconds``, whatever the server does (an open system)."""
    phase, tasks, t0 = Phase(name), [], time.monotonic()
    for i in range(int(rate * args.seconds)):
        await asyncio.sleep(max(0.0, t0 + i / rate - time.monotonic()))
        tasks.append(asyncio.create_task(one(client, args, i, phase)))
    await asyncio.gather(*tasks)
    return phase


async def gauges(client: httpx.AsyncClient) -> dict[str, float]:
    text = (await client.get("/metrics")).text
    out = {}
    for line in text.splitlines():
        if line.startswith("steerserve_engine{"):
            what = line.split('what="', 1)[1].split('"', 1)[0]
            out[what] = float(line.rsplit(" ", 1)[1])
    return out


async def run(args: argparse.Namespace) -> int:
    async with httpx.AsyncClient(base_url=args.base_url, timeout=args.timeout) as client:
        if (await client.get("/health")).status_code != 200:
            print(f"overload: {args.base_url} is not healthy", file=sys.stderr)
            return 2
        rate, saturated = await closed_loop(client, args)
        saturated.show()
        print(f"sustainable rate R = {rate:.2f} requests/s ({args.clients} closed-loop clients)")
        baseline = await open_loop(client, args, args.baseline_load * rate, f"{args.baseline_load:g} x R")
        baseline.show()
        over = await open_loop(client, args, args.factor * rate, f"{args.factor:g} x R")
        over.show()
        for _ in range(60):
            state = await gauges(client)
            if not state.get("pending_requests") and not state.get("running"):
                break
            await asyncio.sleep(1.0)
        print(f"after: pending_requests {state.get('pending_requests')}, running {state.get('running')}")
    p50, p99 = over.pct(50) / baseline.pct(50), over.pct(99) / baseline.pct(99)
    print(f"\naccepted latency under {args.factor:g} x R vs {args.baseline_load:g} x R: p50 ratio {p50:.2f}, "
          f"p99 ratio {p99:.2f}; refused {over.refused} of {over.refused + len(over.latencies) + len(over.failed)}")
    leaked = bool(state.get("pending_requests") or state.get("running"))
    bad = [p for p in (saturated, baseline, over) if p.failed or p.refused_without_retry_after]
    for p in bad:
        print(f"{p.name}: first failures {p.failed[:3]}")
    ok = not bad and not leaked
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    add_arguments(p)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--timeout", type=float, default=300.0, help="per-request limit in seconds")
    return p.parse_args(argv)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The overload run's own options (``load_cancel.py --overload`` takes them too)."""
    p.add_argument("--seconds", type=float, default=30.0, help="length of each phase (default: 30)")
    p.add_argument("--clients", type=int, default=16, help="closed-loop clients that find R (default: 16)")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per request (default: 32)")
    p.add_argument("--factor", type=float, default=2.0, help="overload arrival rate in units of R (default: 2)")
    p.add_argument("--baseline-load", type=float, default=0.8, help="baseline arrival rate in units of R")


def main(argv: Sequence[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))


if __name__ == "__main__":
    raise SystemExit(main())
