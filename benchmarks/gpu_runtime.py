"""The steering runtime on a GPU: a CUDA-graph-captured decode step of a realistic model, steered vs not.

A randomly initialised Llama-shaped model (``--shape 1.5b``: Qwen2-1.5B's dimensions, 28 layers, hidden
1536, bf16; built from a transformers config, nothing downloaded) runs the hf engine's steering path
(``runtime.hooks.SteeringHooks`` reading ``StepTables`` and ``VectorBank``, the op ``steer_guarded_``) on a
static KV cache, so that a decode step (one token for each of B rows at position ``--context``) can be
captured in a CUDA graph (``runtime.graphs.capture_step``, as ``tests/test_cuda_graph.py``). For each
size n in ``--sizes`` (B = n rows):

- checks: the graph's replay equals the eager step, bit for bit, unsteered (no ops) and steered (each row
  its own all-layer spec: a distinct vector on every layer, n x layers bank rows); steering changed the
  logits; and once, a batch of 16 rows with 8 steered gives the 8 unsteered rows exactly their logits of
  an unsteered batch (steering does not leak across rows);
- times: ms per replay, unsteered vs steered, and steered including the host's per-step ``tables.fill``
  (pinned, double-buffered copies: ``runtime.staging``); printed side by side with their ratios.

    python benchmarks/gpu_runtime.py                        # on a GPU: 1.5b, bf16, sizes 1 16 64 256
    python benchmarks/gpu_runtime.py --device cpu --tiny    # the same code path on CPU: tiny, eager, no graph
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from steerserve.runtime.bank import VectorBank  # noqa: E402
from steerserve.runtime.graphs import capture_step  # noqa: E402
from steerserve.runtime.hooks import SteeringHooks  # noqa: E402
from steerserve.runtime.pins import Pin  # noqa: E402
from steerserve.runtime.plan import OpKind, SteerOp, VectorRef  # noqa: E402
from steerserve.runtime.tables import Segment, StepTables  # noqa: E402

SHAPES: dict[str, dict[str, Any]] = {
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True},
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256},
}


class _Eager:
    """Stands in for a CUDA graph where none is captured (CPU): ``replay`` reruns the step into ``out``."""

    def __init__(self, step: Callable[[], torch.Tensor], out: torch.Tensor) -> None:
        self.step, self.out = step, out

    def replay(self) -> None:
        self.out.copy_(self.step())


class Runtime:
    """The model, its steering hooks, bank and tables, for batches of up to ``rows`` decode rows."""

    def __init__(self, shape: str, device: torch.device, dtype: torch.dtype, rows: int, context: int) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(**SHAPES[shape], max_position_embeddings=context + 64, attn_implementation="sdpa")
        torch.manual_seed(0)
        with torch.device(device):
            self.model = LlamaForCausalLM(config).to(dtype).eval()
        self.device, self.context, self.layers = device, context, config.num_hidden_layers
        self.vocab, self.hidden = config.vocab_size, config.hidden_size
        self.bank = VectorBank(rows * self.layers + 1, self.hidden, dtype=dtype, device=device)
        self.tables = StepTables(self.layers, rows, 1, device=device)
        self.hooks = SteeringHooks(self.model.model.layers, self.bank, self.tables)
        self.graphs = device.type == "cuda"

    def decoder(self, rows: int) -> Callable[[], torch.Tensor]:
        """A decode step of ``rows`` rows after an unsteered prefill of ``context`` tokens each; returns
        the step, which gives the last position's logits ``[rows, V]`` (and rewrites the same KV slot)."""
        from transformers import StaticCache

        g = torch.Generator().manual_seed(rows)
        cache = StaticCache(config=self.model.config, max_cache_len=self.context + 1)
        prompt = torch.randint(0, self.vocab, (rows, self.context), generator=g).to(self.device)
        self.tables.fill(0, [])
        self.model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1,
                   cache_position=torch.arange(self.context, device=self.device))
        ids = torch.randint(0, self.vocab, (rows, 1), generator=g).to(self.device)
        pos = torch.full((rows, 1), self.context, device=self.device)
        cpos = torch.tensor([self.context], device=self.device)

        def step() -> torch.Tensor:
            for layer in cache.layers:  # the cache's own write cursor (a device tensor): back to the step's slot
                layer.cumulative_length.fill_(self.context)
            out = self.model(input_ids=ids, position_ids=pos, cache_position=cpos, past_key_values=cache,
                             use_cache=True)
            return out.logits[:, -1]

        return step

    def specs(self, n: int, seed: int = 1, coeff: float = 4.0) -> list[Segment]:
        """Rows ``0..n-1`` each steered by its own all-layer spec (a distinct unit vector per layer)."""
        g = torch.Generator().manual_seed(seed)
        segs = []
        for row in range(n):
            vecs = torch.nn.functional.normalize(torch.randn(self.layers, self.hidden, generator=g), dim=-1)
            ops = [SteerOp(OpKind.ADD, layer, VectorRef.of(vecs[layer]), coeff) for layer in range(self.layers)]
            pin = Pin.acquire(self.bank, ops, self.tables.slots)
            assert pin is not None, "bank full"
            segs.append(Segment(row, self.context, 1, pin.placement(self.bank)))
        return segs

    def capture(self, step: Callable[[], torch.Tensor]) -> tuple[Any, torch.Tensor]:
        if self.graphs:
            return capture_step(step)
        out = step().clone()
        return _Eager(step, out), out

    def fresh_bank(self) -> None:
        """An empty bank (the graphs captured after this read its rows)."""
        self.bank = VectorBank(self.bank.slots, self.hidden, dtype=self.bank.weight.dtype, device=self.device)
        self.hooks.bank = self.bank

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def _time(run: Callable[[], None], iters: int, sync: Callable[[], None]) -> float:
    """Median ms per call over 5 rounds of ``iters`` calls."""
    rounds = []
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            run()
        sync()
        rounds.append((time.perf_counter() - t0) * 1000 / iters)
    return statistics.median(rounds)


def check_no_leak(rt: Runtime) -> None:
    """16 rows, 8 steered: the 8 unsteered rows get exactly the logits of an all-unsteered batch."""
    step = rt.decoder(16)
    rt.tables.fill(16, [])
    plain = step().clone()
    rt.tables.fill(16, rt.specs(8, seed=99))
    graph, out = rt.capture(step)
    graph.replay()
    rt.sync()
    mixed = out.clone()
    assert torch.equal(mixed, step()), "replay != eager (mixed batch)"
    assert torch.equal(mixed[8:], plain[8:]), "steering leaked into unsteered rows"
    assert not torch.equal(mixed[:8], plain[:8]), "steering changed nothing"


def measure(rt: Runtime, n: int, iters: int) -> tuple[float, float, float]:
    """``(unsteered, steered, steered with fill)`` ms per decode step of ``n`` rows."""
    rt.fresh_bank()
    step = rt.decoder(n)
    rt.tables.fill(n, [])
    graph_u, out_u = rt.capture(step)
    graph_u.replay()
    rt.sync()
    assert torch.equal(out_u, step()), f"n={n}: unsteered replay != eager"
    segs = rt.specs(n)
    rt.tables.fill(n, segs)  # no ``bank``: the op gathers inside the graph, nothing per-step is baked in
    graph_s, out_s = rt.capture(step)
    rt.tables.fill(n, segs)
    graph_s.replay()
    rt.sync()
    eager = step()
    assert torch.equal(out_s, eager), f"n={n}: steered replay != eager"
    assert not torch.equal(out_s, out_u), f"n={n}: steering changed nothing"

    def fill_and_replay() -> None:
        rt.tables.fill(n, segs)
        graph_s.replay()

    rt.tables.fill(0, [])
    unsteered = _time(graph_u.replay, iters, rt.sync)
    rt.tables.fill(n, segs)
    steered = _time(graph_s.replay, iters, rt.sync)
    with_fill = _time(fill_and_replay, iters, rt.sync)
    return unsteered, steered, with_fill


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the tiny shape, fp32 (the CPU smoke run)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1.5b")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 16, 64, 256])
    parser.add_argument("--context", type=int, default=128, help="prefilled tokens per row before the step")
    parser.add_argument("--iters", type=int, default=20, help="replays per timing round (5 rounds)")
    parser.add_argument("--eager", action="store_true", help="no graph capture on CUDA either (a fallback)")
    args = parser.parse_args()
    device = torch.device(args.device)
    shape = "tiny" if args.tiny else args.shape
    dtype = torch.float32 if args.tiny or device.type == "cpu" else torch.bfloat16
    rows = max(*args.sizes, 16)
    with torch.inference_mode():
        t0 = time.perf_counter()
        rt = Runtime(shape, device, dtype, rows, args.context)
        rt.graphs = rt.graphs and not args.eager
        print(f"{shape} ({sum(p.numel() for p in rt.model.parameters()) / 1e9:.2f} B params, {dtype}) on {device}"
              f"{', CUDA graphs' if rt.graphs else ', eager (no graph capture)'}; built in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)
        check_no_leak(rt)
        print("checks: replay == eager (steered and unsteered rows); unsteered rows unaffected by steered ones",
              flush=True)
        print(f"{'specs':>6} {'unsteered ms':>13} {'steered ms':>11} {'ratio':>6} {'+fill ms':>9} {'ratio':>6}")
        for n in args.sizes:
            u, s, f = measure(rt, n, args.iters)
            print(f"{n:>6} {u:>13.3f} {s:>11.3f} {s / u:>6.3f} {f:>9.3f} {f / u:>6.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
