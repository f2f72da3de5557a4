"""EAST, entropic activation steering (Rahn et al., 2406.00244): decision situations and the vector.

Situations are two-armed bandit games written in several framings (slot machines, restaurants, ...).
A *run* is one game: its step ``t`` shows the first ``t`` rounds played (arms picked by a noisy
epsilon-greedy player, rewards drawn at random around each arm's hidden mean) and asks for round
``t + 1``. The options are the single tokens ``" A"`` and ``" B"``.

The prompt is the chat-templated user turn followed by the first words of the assistant's answer
("Machine"): on the default model the bare assistant turn starts with "A"/"B" (no space) in only
~5% of the probability mass (it starts "Round ...", "You ..."), whereas after the answer's first words
the two option tokens hold ~95%. Decision prompts are therefore raw text (template applied here), not
chat messages.

Extraction: ``z`` = the layer's state at the last prompt token, ``H`` = entropy (bits) of the next-token
distribution renormalised over the two options, both from one unsteered forward pass, and
``u = sum_k sum_t H_t^k (z_t^k - mean_t z_t^k) / sum H`` with the mean taken per run, scaled to
unit direction x the layer's mean residual norm on these prompts, so that a coefficient ``beta`` is in
units of that norm.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steerserve.engines.hf import HFEngine
from steerserve.methods.base import one_token_ids
from steerserve.runtime.hooks import Capture
from steerserve.runtime.pins import Pin
from steerserve.runtime.plan import SteerOp
from steerserve.runtime.tables import Segment

OPTIONS = (" A", " B")


@dataclass(frozen=True)
class Framing:
    """One way to tell a two-armed bandit game. ``{top}``: the largest reward; ``{r}``: a round number;
    ``{a}``: an arm letter; ``{x}``: a reward."""

    intro: str
    line: str
    question: str
    answer: str  # the assistant's first words; the option token follows


FRAMINGS = (
    Framing("You are playing two slot machines, A and B. Each pull pays between 0 and {top} coins. "
            "Win as many coins as you can.", "Round {r}: you pulled machine {a} and won {x} coins.",
            "Which machine do you pull in round {r}?", "Machine"),
    Framing("There are two restaurants in town, A and B. Each evening you eat at one and rate the meal from "
            "0 to {top}. You want the best meals.", "Evening {r}: restaurant {a}, meal rated {x}.",
            "Where do you eat on evening {r}?", "Restaurant"),
    Framing("There are two fishing spots, A and B. Each day you fish at one and catch up to {top} fish. Catch "
            "as many as you can.", "Day {r}: you fished at spot {a} and caught {x} fish.",
            "Which spot do you fish at on day {r}?", "Spot"),
    Framing("There are two routes to work, A and B. Each day you arrive between 0 and {top} minutes early. "
            "Arrive as early as you can.", "Day {r}: you took route {a} and arrived {x} minutes early.",
            "Which route do you take on day {r}?", "Route"),
    Framing("There are two suppliers, A and B. Each week you order from one; up to {top} parts of an order "
            "are usable. Get as many usable parts as you can.", "Week {r}: supplier {a} delivered {x} usable "
            "parts.", "Which supplier do you order from in week {r}?", "Supplier"),
    Framing("You are a robot in a lab with two levers, A and B. A press gives between 0 and {top} food pellets. "
            "Collect as many pellets as you can.", "Trial {r}: you pressed lever {a} and got {x} pellets.",
            "Which lever do you press in trial {r}?", "Lever"),
)


@dataclass(frozen=True)
class Situation:
    run: int  # the game
    step: int  # rounds already played in it
    user: str  # the user message
    answer: str  # the assistant's first words (the prompt ends with them)
    frame: Framing
    top: int  # the largest reward
    history: str  # the rounds played so far, a line each


def situations(runs: int, steps: int, seed: int) -> list[Situation]:
    """``runs`` games of ``steps`` decisions each (histories of 0 .. steps-1 rounds); fixed by ``seed``."""
    rng = random.Random(seed)
    out = []
    for k in range(runs):
        frame = rng.choice(FRAMINGS)
        top = rng.choice((5, 10, 20))
        means = (rng.uniform(0, top), rng.uniform(0, top))  # hidden from the player
        explore = rng.uniform(0.2, 1.0)  # this player's chance of a random pick
        lines: list[str] = []
        seen: tuple[list[int], list[int]] = ([], [])
        for t in range(steps):
            history = "\n".join(lines) if lines else "You have not played yet."
            user = (f"{frame.intro.format(top=top)}\n\n{history}\n\n{frame.question.format(r=t + 1)} "
                    "Answer with A or B.")
            out.append(Situation(k, t, user, frame.answer, frame, top, history))
            avg = [sum(s) / len(s) if s else top / 2 for s in seen]
            arm = rng.randrange(2) if rng.random() < explore or avg[0] == avg[1] else int(avg[1] > avg[0])
            x = min(top, max(0, round(rng.gauss(means[arm], top / 4))))
            seen[arm].append(x)
            lines.append(frame.line.format(r=t + 1, a="AB"[arm], x=x))
    return out


def prompt_text(tokenizer: Any, s: Situation) -> str:
    """The raw prompt: the chat-templated user turn and the assistant's first words."""
    head = tokenizer.apply_chat_template([{"role": "user", "content": s.user}], tokenize=False,
                                         add_generation_prompt=True)
    return str(head) + s.answer


def game_text(s: Situation) -> str:
    """A *multi-decision* raw prompt: the game so far written as a plain log (no chat template), ending with
    the next round's line up to its arm letter. The model continues the log for as many rounds as it
    likes (3 to 12 in 160 tokens on the default model); each arm letter (" A"/" B") is a decision among
    the other words. As a chat turn ("play rounds 5 to 16") the default model mostly answers one round."""
    return (f"{s.frame.intro.format(top=s.top)}\n\n{s.history}\n"
            + s.frame.line.format(r=s.step + 1, a="\0", x=0).split("\0")[0].rstrip())


def option_ids(tokenizer: Any, options: Sequence[str] = OPTIONS) -> tuple[int, ...]:
    """The option strings' token ids; each must be exactly one token (else ``H`` is not one softmax)."""
    return one_token_ids(lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"]), options,
                         "options")


def choice_entropy(logits: torch.Tensor, options: Sequence[int]) -> torch.Tensor:
    """Entropy in bits of ``softmax(logits)`` renormalised over ``options``: ``[..., V] -> [...]``."""
    logp = torch.log_softmax(logits[..., list(options)].double(), dim=-1)  # [..., n]
    return -(logp.exp() * logp).sum(-1) / torch.log(torch.tensor(2.0, dtype=torch.float64))


def east_direction(states: torch.Tensor, entropies: torch.Tensor, runs: Sequence[int]) -> torch.Tensor:
    """``sum_k sum_t H_t^k (z_t^k - mean_t z_t^k) / sum H``: ``states [N, H]``, ``entropies [N]``, the run of
    each row in ``runs``; the mean is over each run's own rows (per-run centring). Returns ``[H]`` float64."""
    z = states.double()
    run_of = torch.tensor(list(runs))
    centred = torch.empty_like(z)
    for run in run_of.unique():
        rows = run_of == run
        centred[rows] = z[rows] - z[rows].mean(dim=0)
    h = entropies.double()
    return (h[:, None] * centred).sum(dim=0) / h.sum()


@dataclass(frozen=True)
class Scored:
    """One prompt's forward pass: what extraction and evaluation read off it."""

    last: torch.Tensor  # [L, H] the layers' states at the last prompt token
    norm: torch.Tensor  # [L] mean ||h_l[t]|| over tokens 1.. (token 0, the attention sink, is an outlier)
    logits: torch.Tensor  # [V] next-token logits after the last prompt token


async def score(engine: HFEngine, prompts: Sequence[Sequence[int]], layers: Sequence[int],
                ops: Sequence[SteerOp] = ()) -> list[Scored]:
    """Run each prompt through ``engine``'s model, steered by ``ops`` (positions absolute), one call each on
    the engine thread (it owns the model, the bank and the tables; requests may run between calls)."""
    def one(ids: Sequence[int]) -> Scored:
        pin = Pin.acquire(engine.bank, tuple(ops), engine.tables.slots)
        if pin is None:
            raise RuntimeError("the vector bank is full")
        try:
            n = len(ids)
            engine.tables.fill(n, [Segment(0, 0, n, pin.placement(engine.bank))], engine.bank.weight)
            with Capture(engine.layers, layers) as cap:  # registered after the steering hooks: sees their output
                out = engine.model(input_ids=torch.tensor([list(ids)]), use_cache=False, logits_to_keep=1)
            states = torch.stack([cap.outputs[layer][0] for layer in layers], dim=1).float()  # [n, L, H]
            return Scored(states[-1], states[1:].norm(dim=-1).mean(dim=0), out.logits[0, -1].float())
        finally:
            pin.release(engine.bank)
            engine.tables.fill(0, [])

    return list(await asyncio.gather(*(asyncio.wrap_future(engine.call(functools.partial(one, ids)))
                                       for ids in prompts)))


@dataclass(frozen=True)
class Extraction:
    vectors: dict[int, torch.Tensor]  # layer -> [H] float32, norm = the layer's mean residual norm
    norms: dict[int, float]  # layer -> mean residual norm on the decision prompts
    mean_entropy: float  # bits, unsteered, over the extraction prompts


async def extract(engine: HFEngine, prompts: Sequence[Sequence[int]], runs: Sequence[int],
                  layers: Sequence[int], options: Sequence[int]) -> Extraction:
    """The EAST vector at each of ``layers`` from decision prompts (token ids) grouped by ``runs``."""
    scored = await score(engine, prompts, layers)
    h = choice_entropy(torch.stack([s.logits for s in scored]), options)  # [N]
    norms = torch.stack([s.norm for s in scored]).mean(dim=0)  # [L]
    vectors, norm_of = {}, {}
    for i, layer in enumerate(layers):
        u = east_direction(torch.stack([s.last[i] for s in scored]), h, runs)
        vectors[layer] = (u / u.norm() * norms[i]).float()
        norm_of[layer] = float(norms[i])
    return Extraction(vectors, norm_of, float(h.mean()))
