"""``steerserve eval --also-temperature``: a temperature baseline, sampled at T and scored as softmax(logits / T)."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from steerserve.config import Settings
from steerserve.engines.hf import HFEngine
from steerserve.errors import SteerError
from steerserve.evaluation import sweep
from steerserve.evaluation.data import Sample
from steerserve.evaluation.generate import Sampling, body
from steerserve.evaluation.metrics import METRICS, Case, Probes, answers_with_option
from steerserve.evaluation.scoring import ScoreItem, Scorer
from steerserve.service import Service, build_service
from tests.paths import models_dir

REPO = Path(__file__).resolve().parents[1]


def test_temperature_side_settings() -> None:
    side = sweep.side_settings((), (), ["T1.5=1.5", "hot=2"])
    assert [(s.label, s.temperature, s.steering, s.template, s.coeff) for s in side] == \
        [("T1.5", 1.5, None, None, None), ("hot", 2.0, None, None, None)]
    for bad in ("T=0", "T=-1", "T=nan", "T=inf", "T=warm", "=1.5", "1.5"):
        with pytest.raises(SteerError, match="--also-temperature"):
            sweep.side_settings((), (), [bad])
    sampling = Sampling(max_tokens=4, temperature=0.0)
    assert body(Sample(0, "hi"), None, sampling)["temperature"] == 0.0  # the run's
    assert body(Sample(0, "hi"), None, sampling, temperature=1.5)["temperature"] == 1.5  # the setting's own


def test_well_formed_is_a_whole_option() -> None:
    """What a temperature setting samples ("ABC", "About") is not the answer A; "A", " A." and "B)" are."""
    options = (" A", " B")
    assert all(answers_with_option(t, options) for t in ("A", " A.", " B) because", "A\nmore", " B,"))
    assert not any(answers_with_option(t, options) for t in (" ABC", " About", "Bob", " #", "", " was A"))


@pytest.fixture(scope="module")
async def service(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Service]:
    settings = Settings(engine="hf", home=tmp_path_factory.mktemp("eval-t"), models_root=models_dir(),
                        vectors_dir=REPO / "vectors", max_batch=8, bank_slots=64)
    svc = build_service(settings, log=lambda _m: None)
    await svc.start()
    yield svc
    await svc.stop()


@pytest.mark.slow
async def test_scorer_at_temperature(service: Service) -> None:
    """At T the scored log-probabilities are the model's divided by T up to a constant (so log-ratios shrink
    by exactly 1/T), greedy choices are unchanged, the choice entropy over two options rises, and the KL to
    the model's own distribution is 0 at T = 1 and positive at T = 2."""
    assert isinstance(service.engine, HFEngine)
    tok = service.renderer.tokenize
    options = (" A", " B")
    probes = Probes((), options, tuple(tok(o)[0] for o in options))
    scorer = Scorer(service.engine, service.ctx, probes.ids)
    prompt = service.render(prompt="Pick a machine, A or B. I pick machine")
    cont = tuple(tok(" A, because it paid more."))
    one, hot = await scorer.score([ScoreItem(prompt, cont, (), len(cont), 1.0),
                                   ScoreItem(prompt, cont, (), len(cont), 2.0)], kl=True)
    a, b = probes.option_ids
    assert hot.first[a] - hot.first[b] == pytest.approx((one.first[a] - one.first[b]) / 2.0, abs=1e-4)
    assert hot.top == one.top
    assert one.kl is not None and all(k == 0.0 for k in one.kl)
    assert hot.kl is not None and len(hot.kl) == len(cont) and all(k > 0 for k in hot.kl)
    # a token the model is sure of loses probability when the distribution is flattened
    assert all(h < o for h, o in zip(hot.chosen, one.chosen, strict=True) if o > math.log(0.9))

    def entropy(first: dict[int, float]) -> float:
        case = Case(Sample(0, "q"), " A", 1, "stop", first)
        return METRICS["choice_entropy"].values(case, probes)["choice_entropy"]

    assert abs(one.first[a] - one.first[b]) > 0.1  # not already uniform over the options
    assert entropy(one.first) < entropy(hot.first) <= 1.0
