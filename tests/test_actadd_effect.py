"""ActAdd "Love" - "Hate" on the default model moves the sentiment of completions, in both directions.

Through the live server (``POST /generate``), as users steer: 16 neutral chat prompts are completed
greedily three times -- unsteered, with ``Love - Hate`` and with ``Hate - Love`` -- and each set is scored
with VADER's compound score (-1 .. +1, mean over prompts).

Measured (SmolLM2-135M-Instruct, fp32, CPU, layer 12, coeff 4, 32 tokens): baseline +0.415,
Love-Hate +0.489, Hate-Love +0.288. The unsteered model is already cheerful, which leaves little room
upwards; the margin (0.05) is about two thirds of the smaller observed shift. Layers 2-20 and coefficients
2-12 were swept: the upward shift is small everywhere on this model, the downward one larger.
Greedy decoding makes the numbers reproducible; the requests are concurrent so the engine batches them.

Caveat: the upward half holds for these 16 prompts, not in general. With the same settings, 24 more
prompts of the same kind give Love-Hate 0.145 *below* their baseline (+0.349 vs +0.494), and seeded
sampling (T 0.8, 40 prompts x 3 seeds) puts the shift at -0.003 (Love-Hate) and -0.088 (Hate-Love).
So this test reliably catches broken wiring (a no-op, a flipped sign, steering that never reaches the
model) for these prompts, but it does not show a general upward effect on this model.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from statistics import mean
from typing import Any

import httpx
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

PROMPTS = (
    "I went to the store today and", "Tell me about your weekend.", "Describe the weather.",
    "Write a sentence about my neighbour.", "What do you think about Mondays?",
    "Write a short note about the office.", "Describe a walk in the city.", "Tell me about your morning commute.",
    "Write a sentence about a cat.", "What happened at the meeting yesterday?", "Describe the train station.",
    "Write a sentence about my brother.", "Tell me about the new restaurant in town.", "Describe your kitchen.",
    "Write a sentence about the movie I watched.", "What is your opinion of my car?",
)
LAYER, COEFF, MAX_TOKENS, MARGIN = 12, 4.0, 32, 0.05
_VADER = SentimentIntensityAnalyzer()


def actadd(positive: str, negative: str, coeff: float = COEFF) -> dict[str, Any]:
    return {"interventions": [{"method": "actadd", "positive": positive, "negative": negative,
                               "layer": LAYER, "coeff": coeff}]}


async def completions(base_url: str, steering: Mapping[str, Any] | None,
                      prompts: tuple[str, ...] = PROMPTS) -> list[dict[str, Any]]:
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


async def test_love_minus_hate_raises_sentiment_and_the_reverse_lowers_it(
    base_url: str, record_property: Callable[[str, object], None]
) -> None:
    base = sentiment(await completions(base_url, None))
    love = sentiment(await completions(base_url, actadd("Love", "Hate")))
    hate = sentiment(await completions(base_url, actadd("Hate", "Love")))
    for key, value in (("vader_baseline", base), ("vader_love", love), ("vader_hate", hate)):
        record_property(key, round(value, 3))
    numbers = f"baseline {base:+.3f}, Love-Hate {love:+.3f}, Hate-Love {hate:+.3f}"
    assert love > base + MARGIN, numbers
    assert hate < base - MARGIN, numbers


async def test_zero_coefficient_and_equal_pair_are_unsteered(base_url: str) -> None:
    prompts = PROMPTS[:2]
    base = await completions(base_url, None, prompts)
    zero = await completions(base_url, actadd("Love", "Hate", 0.0), prompts)
    same = await completions(base_url, actadd("Love", "Love"), prompts)
    assert [o["text"] for o in zero] == [o["text"] for o in base]
    assert [o["text"] for o in same] == [o["text"] for o in base]
    steered = await completions(base_url, actadd("Love", "Hate", 8.0), prompts)
    assert [o["text"] for o in steered] != [o["text"] for o in base]  # the path really steers
