"""ActAdd on the default model: the pair's construction, and its effect on the real model.

The construction (``methods/actadd.py``): each prompt of the pair is read after the request's own tokens
before the front, the shorter one padded with the newline token. Checked exactly against the engine's
hidden states, and for the property that motivated it: no row is an attention-sink outlier.

The effect, through the live server (``POST /generate``) as users steer: the first ``PROMPTS`` prompts of
``vectors/prompts/neutral_tune.txt`` (the prompts the recommended setting was chosen on; the held-out
``neutral_eval.txt`` is kept for ``steerserve eval``, see the README) are completed greedily with the
recommended pair (``POSITIVE`` - ``NEGATIVE`` at ``LAYER``) at ``+COEFF`` and at ``-COEFF``, and each set
is scored with VADER's compound score (-1 .. +1, mean over prompts). ``+COEFF`` must beat ``-COEFF`` by
``MARGIN``: a vector that does not steer (or steers the wrong way) fails. Greedy decoding makes the numbers
reproducible; the requests are concurrent so the engine batches them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from statistics import mean, median
from typing import Any

import httpx
import torch
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from steerserve.config import Settings
from steerserve.engines.hf import HFEngine
from steerserve.methods.actadd import ActAdd
from steerserve.prompts import PromptRenderer
from steerserve.spec import ResolveContext
from steerserve.store.artifacts import ArtifactStore

TUNE_FILE = Path(__file__).resolve().parents[1] / "vectors" / "prompts" / "neutral_tune.txt"
PROMPTS = 8
# The README's recommended setting (chosen on neutral_tune.txt, evaluated on neutral_eval.txt).
POSITIVE, NEGATIVE = "I feel wonderful and happy today!", "I feel terrible and sad today!"
LAYER, COEFF, MAX_TOKENS, MARGIN = 3, 6.0, 32, 0.3
_VADER = SentimentIntensityAnalyzer()


def tune_prompts(n: int = PROMPTS) -> tuple[str, ...]:
    return tuple(line for line in TUNE_FILE.read_text(encoding="utf-8").splitlines() if line.strip())[:n]


def actadd(positive: str = POSITIVE, negative: str = NEGATIVE, coeff: float = COEFF) -> dict[str, Any]:
    return {"interventions": [{"method": "actadd", "positive": positive, "negative": negative,
                               "layer": LAYER, "coeff": coeff}]}


async def completions(base_url: str, steering: Mapping[str, Any] | None,
                      prompts: tuple[str, ...]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        async def one(prompt: str) -> dict[str, Any]:
            body: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "temperature": 0,
                                    "max_tokens": MAX_TOKENS, "steering": steering}
            r = await client.post("/generate", json=body)
            assert r.status_code == 200, r.text
            out: dict[str, Any] = r.json()
            return out

        return list(await asyncio.gather(*(one(p) for p in prompts)))


def sentiment(outputs: list[dict[str, Any]]) -> float:
    return mean(float(_VADER.polarity_scores(o["text"])["compound"]) for o in outputs)


async def test_pair_is_read_in_the_requests_context(hf_engine: HFEngine, tmp_path: Path) -> None:
    renderer = PromptRenderer(hf_engine.tokenizer, 2048)
    ctx = ResolveContext(Settings(), hf_engine.info, ArtifactStore(tmp_path, hf_engine.info), renderer.tokenize,
                         hf_engine.hidden_states)
    prompt = renderer.render(messages=[{"role": "user", "content": "Describe a chair."}])
    compiled = await ActAdd().compile({"positive": "Love", "negative": "Hate", "layer": 6, "coeff": 1.0},
                                      prompt, ctx, "s")
    (op,) = compiled.ops
    a = prompt.user_start
    love, hate, newline = renderer.tokenize("Love"), renderer.tokenize("Hate"), renderer.tokenize("\n")
    assert (len(love), len(hate), len(newline)) == (1, 2, 1)  # so "Love" is padded by one newline
    prefix = list(prompt.token_ids[:a])
    hp, hn = await hf_engine.hidden_states([prefix + love + newline, prefix + hate], [6])
    assert (op.start, op.stop, op.layer) == (a, a + 2, 6)
    torch.testing.assert_close(op.vector.data, (hp[a:, 0] - hn[a:, 0]).to(op.vector.data.dtype))

    # Why in context: no row is an outlier against the request's own states at that layer.
    (states,) = await hf_engine.hidden_states([prompt.token_ids], [6])
    typical = median(float(x) for x in states[a:, 0].norm(dim=-1))
    assert all(float(x) < 1.5 * typical for x in op.vector.data.norm(dim=-1)), (op.vector.data.norm(dim=-1), typical)

    # Raw prompts: the first token is the context (it plays BOS's part), steering starts at position 1.
    raw = renderer.render(prompt="Love is")
    (op,) = (await ActAdd().compile({"positive": "Love", "negative": "Hate", "layer": 6, "coeff": 1.0},
                                    raw, ctx, "s")).ops
    assert (op.start, op.stop) == (1, len(raw.token_ids))


async def test_recommended_pair_moves_sentiment_both_ways(
    base_url: str, record_property: Callable[[str, object], None]
) -> None:
    prompts = tune_prompts()
    plus = sentiment(await completions(base_url, actadd(), prompts))
    minus = sentiment(await completions(base_url, actadd(coeff=-COEFF), prompts))
    for key, value in (("vader_plus", plus), ("vader_minus", minus)):
        record_property(key, round(value, 3))
    assert plus > minus + MARGIN, f"+c {plus:+.3f}, -c {minus:+.3f}"


async def test_zero_coefficient_and_equal_pair_are_unsteered(base_url: str) -> None:
    prompts = tune_prompts(2)
    base = await completions(base_url, None, prompts)
    zero = await completions(base_url, actadd(coeff=0.0), prompts)
    same = await completions(base_url, actadd(POSITIVE, POSITIVE), prompts)
    assert [o["text"] for o in zero] == [o["text"] for o in base]
    assert [o["text"] for o in same] == [o["text"] for o in base]
    steered = await completions(base_url, actadd(), prompts)
    assert [o["text"] for o in steered] != [o["text"] for o in base]  # the path really steers
