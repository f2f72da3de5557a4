"""``steerserve eval``: the metric functions, the bootstrap, the strength sweep, the scorer's identities on
the real default model, and one end-to-end in-process run of the command."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from steerserve.api import create_app
from steerserve.cli import main
from steerserve.config import Settings
from steerserve.engines.base import SamplingParams
from steerserve.engines.hf import HFEngine
from steerserve.errors import SteerError
from steerserve.evaluation import report, sweep
from steerserve.evaluation.data import Sample, read_samples, with_draws
from steerserve.evaluation.generate import Sampling, body, generate_all
from steerserve.evaluation.metrics import (
    METRICS,
    Case,
    Probes,
    Row,
    is_refusal,
    last_number,
    log_well_formed,
    reference_number,
    repetition,
)
from steerserve.evaluation.runner import Result, RowResult
from steerserve.evaluation.scoring import ScoreItem, Scorer
from steerserve.evaluation.stats import bootstrap, paired_delta, per_prompt
from steerserve.evaluation.sweep import Setting
from steerserve.service import Service, build_service
from steerserve.spec import PromptInfo
from tests.paths import models_dir

REPO = Path(__file__).resolve().parents[1]
JOY = {"interventions": [{"method": "add", "vector": "joy", "layers": [4, 5, 6, 7, 8], "coeff": 1.5}]}


def _case(text: str, reference: str | None = None, first: dict[int, float] | None = None,
          tokens: int = 10, finish: str = "stop") -> Case:
    return Case(Sample(0, "q", reference), text, tokens, finish, first)


# ---- metrics, stats, sweep (no model) ----


def test_refusal_judge() -> None:
    assert is_refusal("I'm sorry, but I can't help with that.")
    assert is_refusal("i CANNOT do this")  # case-insensitive
    assert is_refusal("I\u2019m unable to comply.")  # curly apostrophe
    assert is_refusal("Well. As an AI, I have no opinions.")
    assert not is_refusal("Sure! Here is a poem about the sea.")
    assert not is_refusal("I can help with that.")
    assert METRICS["refusal"].values(_case("I apologize."), Probes()) == {"refusal": 1.0}


def test_gsm8k_answer_parse() -> None:
    assert reference_number("She pays 3 * 4 = <<3*4=12>>12 dollars.\n#### 1,234") == 1234.0
    assert reference_number("#### -7") == -7.0
    assert last_number("So 2 + 3 = 5, and the total is 1,234.") == 1234.0
    assert last_number("It costs 3.50 dollars") == 3.5
    assert last_number("no digits here") is None
    answer = METRICS["answer"].values
    assert answer(_case("The answer is 1,234", "work\n#### 1234"), Probes()) == \
        {"answer": 1.0, "answered": 1.0, "final_answer": 1.0}
    assert answer(_case("The answer is 12 or 1233", "#### 1234"), Probes()) == \
        {"answer": 0.0, "answered": 1.0, "final_answer": 1.0}
    assert answer(_case("I do not know", "#### 1234"), Probes()) == \
        {"answer": 0.0, "answered": 0.0, "final_answer": 0.0}
    # a number earlier but not on the last line, or a reply cut by the budget: no final answer
    assert answer(_case("2 + 2 = 4\nso we are done\n", "#### 4"), Probes())["final_answer"] == 0.0
    assert answer(_case("2 + 2 = 4", "#### 4", finish="length"), Probes())["final_answer"] == 0.0
    with pytest.raises(SteerError):
        answer(_case("42", None), Probes())


def test_repetition_and_length() -> None:
    assert repetition("the cat sat on the mat today") == 0.0
    assert repetition("a b c a b c a b c") == pytest.approx(1 - 3 / 7)  # 7 trigrams, 3 distinct
    assert repetition("too short") == 0.0
    vals = METRICS["length"].values(_case("a b c a b c", tokens=16, finish="length"), Probes())
    assert vals == {"tokens": 16.0, "hit_budget": 1.0, "repetition": pytest.approx(1 - 3 / 4)}


def test_concept_mentions_count_whole_words_and_plurals() -> None:
    m = METRICS["mentions"].values
    food = Probes(concept=("pizza", "ice cream", "tomato"))
    got = m(_case("Pizzas and ice  cream; a tomato's skin. No pizzeria here."), food)
    assert got == {"mentions": 1.0, "mentions_per_100_words": pytest.approx(100 * 3 / 10)}
    assert m(_case("A pizzeria and icecream."), food)["mentions"] == 0.0  # whole words only
    with pytest.raises(SteerError, match="--concept"):
        m(_case("pizza"), Probes())


def test_sentiment_sign() -> None:
    s = METRICS["sentiment"].values
    assert s(_case("What a wonderful, happy day!"), Probes())["sentiment"] > 0.5
    assert s(_case("This is awful, I hate it."), Probes())["sentiment"] < -0.5


def test_scored_metrics_from_log_probs() -> None:
    # p(R) = 0.5 -> log-odds 0; two equally likely options -> 1 bit; four -> 2 bits
    probes = Probes(refusal=(1, 2), options=("A", "B"), option_ids=(10, 11))
    first = {1: math.log(0.25), 2: math.log(0.25), 10: math.log(0.1), 11: math.log(0.1)}
    assert METRICS["refusal_score"].values(_case("x", first=first), probes)["refusal_score"] == pytest.approx(0.0)
    out = METRICS["choice_entropy"].values(_case(" B) because", first=first), probes)
    assert out == {"choice_entropy": pytest.approx(1.0), "well_formed": 1.0}
    first[11] = math.log(0.1 * 3)  # 1:3 -> H = 0.811 bits
    out = METRICS["choice_entropy"].values(_case("C", first=first), probes)
    assert out["choice_entropy"] == pytest.approx(-(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75)))
    assert out["well_formed"] == 0.0


def test_decision_entropy_reads_decisions_or_the_loop_report() -> None:
    probes = Probes(options=(" A", " B"), option_ids=(10, 11))
    m = METRICS["decision_entropy"]
    case = dataclasses.replace(_case("x"), decisions=((1.0, 0.9), (0.2, 0.1), (0.5, 0.5)))
    values = m.values(case, probes)
    assert set(values) == {"decision_entropy", "decisions", "log_well_formed"}
    assert values["decision_entropy"] == pytest.approx(0.75) and values["decisions"] == 2.0  # mass >= 0.5
    none = dataclasses.replace(_case("x"), decisions=((1.0, 0.2),))
    assert math.isnan(m.values(none, probes)["decision_entropy"])
    looped = dataclasses.replace(case, report={"mean_entropy_bits": 0.4, "loop_steps": 7.0})
    values = m.values(looped, probes)  # the engine's own measurement
    assert set(values) == {"decision_entropy", "decisions", "log_well_formed"}
    assert (values["decision_entropy"], values["decisions"]) == (0.4, 7.0)
    with pytest.raises(SteerError):
        m.values(case, Probes())


def test_log_well_formed_compares_line_shapes_with_the_prompt() -> None:
    prompt = "Two spots, A and B.\n\nDay 1: you fished at spot A and caught 3 fish.\nDay 2: you fished at spot"
    options = (" A", " B")
    good = " B and caught 12 fish.\nDay 3: you fished at spot A and caught 0 fish.\nDay 4: you fish"
    assert log_well_formed(prompt, good, options) == 1.0  # the cut last line is not judged
    bad = " B and caught 1 person.\nDay 3: you fished at spot A and caught 2 fish.\nDay 4: you fished at spot C" \
          " and caught 2 fish.\nSo spot A is better.\n"
    assert log_well_formed(prompt, bad, options) == pytest.approx(1 / 3)  # not a round line: the summary
    assert log_well_formed(prompt, "\nWhich spot is best?\n", options) == 0.0  # the round line left unfinished
    assert math.isnan(log_well_formed(prompt, " B and caught", options))  # no complete line
    case = dataclasses.replace(_case("x"), sample=Sample(0, prompt), text=bad, decisions=((1.0, 0.9),))
    values = METRICS["decision_entropy"].values(case, Probes(options=options, option_ids=(10, 11)))
    assert values["log_well_formed"] == pytest.approx(1 / 3)


def test_bootstrap_interval() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(2.0, 1.0, size=50).tolist()
    a = bootstrap(values, "mean", seed=7)
    assert a.lo < float(np.mean(values)) < a.hi and a.value == pytest.approx(np.mean(values))
    assert a == bootstrap(values, "mean", seed=7)  # deterministic with a seed
    assert a != bootstrap(values, "mean", seed=8)
    assert bootstrap(values, "median").value == pytest.approx(np.median(values))
    assert bootstrap(values, "p90").value == pytest.approx(np.percentile(values, 90))
    assert bootstrap([3.0] * 5).text() == "3 [3, 3]"
    assert bootstrap([1.0, float("nan"), 3.0]).n == 2  # NaN = not applicable, left out
    assert math.isnan(bootstrap([]).value)
    d = paired_delta([v + 1.0 for v in values], values, seed=3)
    assert (d.value, d.lo, d.hi) == pytest.approx((1.0, 1.0, 1.0))  # a constant shift: no spread at all


def test_markdown_shows_the_paired_difference() -> None:
    """Each steered cell carries its difference to the baseline on the same prompts, with the paired
    interval: the figure that says whether an effect is significant (the levels' intervals overlap here)."""
    base, up = [0.1, 0.5, 0.9, 0.3], [0.3, 0.7, 1.1, 0.5]
    row = RowResult("sentiment", Row("sentiment", "sentiment"), (bootstrap(base), bootstrap(up)),
                    (None, paired_delta(up, base)))
    result = Result((Setting("baseline", None, None), Setting("coeff=2", 2.0, {"interventions": []})), (), (), (),
                    (row,), (), "m")
    (line,) = [ln for ln in report.markdown(result).splitlines() if ln.startswith("| sentiment |")]
    _, baseline, steered = line.strip("| ").split(" | ")
    assert baseline == bootstrap(base).text() and "Δ" not in baseline
    assert steered == f"{bootstrap(up).text()} (Δ +0.2 [+0.2, +0.2])"  # a constant shift: no spread


def test_draws_are_paired_seeds_and_prompts_are_the_unit() -> None:
    """Draw ``d`` of a prompt is sampled with seed ``seed + d`` in every setting, and the statistics average a
    prompt's draws before resampling prompts."""
    draws = with_draws([Sample(4, "a"), Sample(7, "b")], 2)
    assert [(s.index, s.draw) for s in draws] == [(4, 0), (4, 1), (7, 0), (7, 1)]
    assert [body(s, None, Sampling(seed=5))["seed"] for s in draws] == [5, 6, 5, 6]
    assert per_prompt([1.0, 3.0, float("nan"), 4.0], [s.index for s in draws]) == [2.0, 4.0]
    with pytest.raises(SteerError, match="--samples"):
        with_draws(draws, 0)


def test_sweep_rule() -> None:
    spec: dict[str, Any] = {"interventions": [{"method": "add", "vector": "v", "coeff": 2.0},
                                              {"method": "ablate", "vector": "r"},
                                              {"method": "x", "beta": 1, "gamma": 3}]}
    out = sweep.with_strength(spec, -1.0)
    assert out["interventions"][0]["coeff"] == -1.0
    assert out["interventions"][1] == {"method": "ablate", "vector": "r"}
    assert out["interventions"][2] == {"method": "x", "beta": -1.0, "gamma": 3}  # the first strength field
    assert spec["interventions"][0]["coeff"] == 2.0  # not modified in place
    assert sweep.with_strength(spec, 5.0, "gamma")["interventions"][2] == {"method": "x", "beta": 1, "gamma": 5.0}
    sae = {"interventions": [{"method": "sae_feature", "sae": "s", "features": {"3": 1, "9": 2}, "mode": "clamp"}]}
    assert sweep.with_strength(sae, 6.0)["interventions"][0]["features"] == {"3": 6.0, "9": 6.0}  # every feature
    with pytest.raises(SteerError, match="--coeff-field"):
        sweep.with_strength({"interventions": [{"method": "ablate", "vector": "r"}]}, 1.0)
    settings = sweep.settings(spec, [-1.0, 1.0])
    assert [s.label for s in settings] == ["baseline", "coeff=-1", "coeff=1"] and settings[0].steering is None
    assert [s.label for s in sweep.settings(spec, None)] == ["baseline", "spec"]
    with pytest.raises(SteerError):
        sweep.settings(spec, [1.0, 1.0])
    assert sweep.load_spec(json.dumps(JOY)) == JOY
    with pytest.raises(SteerError):
        sweep.load_spec('{"steering": {}}')


def test_sweep_auto_and_side_settings(tmp_path: Path) -> None:
    asc: dict[str, Any] = {"interventions": [{"method": "cot_compress", "vector": "asc", "gamma": 1.0}]}
    assert [sweep.parse_coeff(x) for x in ("auto", "AUTO", "2", "-0.5")] == ["auto", "auto", 2.0, -0.5]
    with pytest.raises(ValueError):
        sweep.parse_coeff("big")
    got = sweep.settings(asc, ["auto", 2.0])
    assert [(s.label, s.coeff) for s in got] == [("baseline", None), ("coeff=auto", None), ("coeff=2", 2.0)]
    assert got[1].steering is not None and got[1].steering["interventions"][0]["gamma"] == "auto"
    auto_spec = sweep.with_strength(asc, "auto")
    assert sweep.with_strength(auto_spec, 3.0)["interventions"][0]["gamma"] == 3.0  # "auto" is a strength too
    with pytest.raises(SteerError):
        sweep.settings(asc, ["auto", "auto"])
    f = tmp_path / "random.json"
    f.write_text(json.dumps({"interventions": [{"method": "cot_compress", "vector": "random", "gamma": 2}]}))
    side = sweep.side_settings([f"random g2={f}"], ["concise={prompt}\nBe concise. a=b"])
    assert [(s.label, s.template) for s in side] == [("random g2", None), ("concise", "{prompt}\nBe concise. a=b")]
    assert side[0].steering == json.loads(f.read_text()) and side[1].steering is None  # label ends at the first =
    for bad in (["no-equals"], ["=x"], [f"random g=2={f}"]):  # the last: label "random g", spec "2=..."
        with pytest.raises(SteerError, match="--also-spec"):
            sweep.side_settings(bad)
    with pytest.raises(SteerError, match="--also-prompt"):
        sweep.side_settings((), ["concise=Be concise."])  # no {prompt}
    with pytest.raises(SteerError, match="labelled 'baseline'"):
        sweep.unique_labels([*sweep.settings(asc, None), *sweep.side_settings((), ["baseline={prompt}"])])


def test_prompt_templates() -> None:
    sample = Sample(0, "What is {x}? 2+2")
    assert sweep.apply_template("{prompt}\nLet's think step by step.", sample.prompt) == \
        "What is {x}? 2+2\nLet's think step by step."  # braces in the prompt are kept
    assert sweep.check_template("Q: {prompt} {brief}", "--prompt-template") == "Q: {prompt} {brief}"
    with pytest.raises(SteerError, match="--prompt-template"):
        sweep.check_template("{prompt} {prompt}", "--prompt-template")
    sampling = Sampling(max_tokens=8, template="{prompt}!")
    assert body(sample, None, sampling)["messages"] == [{"role": "user", "content": "What is {x}? 2+2!"}]
    own = body(sample, None, sampling, template="Briefly: {prompt}")  # a setting's own template wins
    assert own["messages"][0]["content"] == "Briefly: What is {x}? 2+2"
    raw = body(sample, None, Sampling(chat=False))
    assert raw["prompt"] == sample.prompt and "messages" not in raw


def test_random_control_vector(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import safetensors
    import safetensors.torch
    import torch

    from steerserve.tools.extract.cli import random_like

    like = {3: torch.full((8,), 2.0), 1: torch.ones(8)}
    a, b = random_like(like, 0), random_like(like, 0)
    assert all(torch.equal(a[k], b[k]) for k in like)  # seeded
    assert not torch.equal(a[3], random_like(like, 1)[3])
    assert [round(float(a[k].norm()), 5) for k in (1, 3)] == [round(float(like[k].norm()), 5) for k in (1, 3)]
    src, out = tmp_path / "v.safetensors", tmp_path / "r.safetensors"
    header = {"kind": "vector", "model_fingerprint": "f", "model_name": "m", "hidden_size": "8", "num_layers": "4",
              "layer_convention": "c", "method": "asc", "calibration": "{}", "provenance": "{}"}
    safetensors.torch.save_file({f"layer.{k}": v for k, v in like.items()}, str(src), metadata=header)
    with pytest.raises(SystemExit) as exited:
        main(["extract", "random", "--like", str(src), "--seed", "4", "--out", str(out)])
    assert exited.value.code in (0, None)
    with safetensors.safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        got = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert meta["method"] == "random" and "calibration" not in meta and meta["model_fingerprint"] == "f"
    assert json.loads(meta["provenance"])["seed"] == 4
    assert torch.equal(got["layer.3"], random_like(like, 4)[3])


def test_read_samples(tmp_path: Path) -> None:
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join(json.dumps({"question": f"q{i}", "answer": f"#### {i}"}) for i in range(5)) + "\n")
    got = read_samples(f, "question", limit=2, offset=1, reference_field="answer")
    assert got == [Sample(1, "q1", "#### 1"), Sample(2, "q2", "#### 2")]
    with pytest.raises(SteerError, match="--field"):
        read_samples(f, "instruction")
    txt = read_samples(REPO / "vectors" / "prompts" / "joy.txt", "x", limit=3)
    assert len(txt) == 3 and txt[0].reference is None


# ---- the scorer on the real model ----


@pytest.fixture(scope="module")
def eval_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("eval-home")


@pytest.fixture(scope="module")
async def eval_service(eval_home: Path) -> AsyncIterator[Service]:
    settings = Settings(engine="hf", home=eval_home, models_root=models_dir(), vectors_dir=REPO / "vectors",
                        max_batch=8, bank_slots=256)
    service = build_service(settings, log=lambda _m: None)
    await service.start()
    yield service
    await service.stop()


async def _greedy(service: Service, prompt: PromptInfo, steering: dict[str, Any] | None, n: int) -> tuple[int, ...]:
    sub = await service.submit(prompt, SamplingParams(max_tokens=n, ignore_eos=True), steering)
    ids: list[int] = []
    async for out in sub.outputs:
        ids += out.token_ids
    return tuple(ids)


def _prompts(service: Service, count: int) -> list[PromptInfo]:
    lines = (REPO / "vectors" / "prompts" / "misery.txt").read_text().splitlines()[:count]
    return [service.render(messages=[{"role": "user", "content": p}]) for p in lines]


@pytest.mark.slow
async def test_scorer_identities(eval_service: Service) -> None:
    """Teacher forcing reproduces the engine: on the engine's own greedy continuation (steered or not),
    every scored position's most likely token is the one the engine chose; a coefficient-0 spec's KL to
    the unsteered model is exactly 0, a real vector's is not."""
    assert isinstance(eval_service.engine, HFEngine)
    scorer = Scorer(eval_service.engine, eval_service.ctx)
    zero_spec = sweep.with_strength(JOY, 0.0)
    own, zero = [], []  # own: each model's own greedy reply; zero: coefficient 0 along the steered reply
    for p in _prompts(eval_service, 3):  # different lengths: right padding inside one batch
        base = await _greedy(eval_service, p, None, 12)
        steered = await _greedy(eval_service, p, JOY, 12)
        assert steered != base  # the vector changes what is generated
        own += [ScoreItem(p, base, (), 12), ScoreItem(p, steered, (await scorer.resolve(JOY, p)).ops, 12)]
        zero.append(ScoreItem(p, steered, (await scorer.resolve(zero_spec, p)).ops, 12))
    assert all(item.ops for item in zero)  # steered at coefficient 0, not unsteered
    scored = await scorer.score([*own, *zero], kl=True)
    kls = []
    for s in scored:
        assert len(s.chosen) == 12 and all(math.isfinite(c) and c <= 0 for c in s.chosen)
        assert s.kl is not None and len(s.kl) == 12
        kls.append(s.kl)
    for item, s, kl in zip(own, scored, kls, strict=False):
        assert s.top == item.continuation  # the scorer's greedy choice at every position is the engine's
        assert (sum(kl) / 12 > 0.05) if item.ops else all(k == 0.0 for k in kl)
    for kl in kls[len(own):]:
        assert all(k == 0.0 for k in kl)  # coefficient 0: exactly 0


@pytest.mark.slow
async def test_http_generation(eval_service: Service) -> None:
    """The shared HTTP path on the in-process app: same body, same reply; a bad spec names its field."""
    app = create_app(eval_service, eval_service.settings)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://eval") as client:
        payload = body(Sample(0, "Tell me about your day."), None, Sampling(max_tokens=6))
        replies = await generate_all(client, [payload, payload], 2, progress=False)
        assert replies[0] == replies[1] and replies[0].completion_tokens <= 6 and replies[0].text
        bad = {"interventions": [{"method": "add", "vector": "no-such-vector", "coeff": 1.0}]}
        with pytest.raises(SteerError, match=r"400.*steering\.interventions\.0\.vector"):
            await generate_all(client, [body(Sample(0, "hi"), bad, Sampling(max_tokens=2))], 1, progress=False)


@pytest.mark.slow
def test_eval_cli_end_to_end(eval_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str]) -> None:
    """``steerserve eval`` in-process on 4 joy prompts: three files, and joy+ reads happier than joy-."""
    monkeypatch.setenv("STEERSERVE_MODELS_DIR", str(models_dir()))  # the prepared model: nothing re-prepared
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        main(["eval", "--spec", json.dumps(JOY), "--data", str(REPO / "vectors" / "prompts" / "joy.txt"),
              "--limit", "4", "--coeffs", "-1.5", "1.5", "--max-tokens", "16", "--metric", "sentiment",
              "--home", str(eval_home), "--out", str(out), "--quiet"])
    assert exited.value.code == 0
    assert (out / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads((out / "eval.json").read_text())
    table = {r["key"]: r["values"] for r in data["table"]}
    assert table["sentiment"]["coeff=1.5"]["value"] > table["sentiment"]["coeff=-1.5"]["value"]
    assert table["kl"]["baseline"]["value"] == 0 and table["kl"]["coeff=1.5"]["value"] > 0
    assert len(data["samples"]) == 4 and set(data["samples"][0]["outputs"]) == {"baseline", "coeff=-1.5", "coeff=1.5"}
    replies = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert [(r["setting"], r["index"]) for r in replies] == [
        (st, i) for st in ("baseline", "coeff=-1.5", "coeff=1.5") for i in range(4)]
    assert [r["text"] for r in replies[:4]] == [s["outputs"]["baseline"]["text"] for s in data["samples"]]
    md = (out / "eval.md").read_text()
    assert "| metric | baseline | coeff=-1.5 | coeff=1.5 |" in md and "| sentiment |" in md
    printed = capsys.readouterr().out
    assert md.strip() in printed and "[coeff=1.5]" in printed


@pytest.mark.slow
def test_eval_cli_several_replies_per_prompt(eval_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """``--samples 3``: three sampled replies per prompt and setting, the table's n counts prompts (each
    prompt's value is the mean of its replies), and greedy decoding refuses it."""
    monkeypatch.setenv("STEERSERVE_MODELS_DIR", str(models_dir()))
    out = tmp_path / "out"
    args = ["eval", "--spec", json.dumps(JOY), "--data", str(REPO / "vectors" / "prompts" / "joy.txt"), "--limit", "2",
            "--max-tokens", "6", "--metric", "length", "--no-kl", "--home", str(eval_home), "--out", str(out),
            "--quiet", "--samples", "3"]
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == 2 and "--samples" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as exited:
        main([*args, "--temperature", "0.9", "--seed", "5"])
    assert exited.value.code == 0
    replies = [json.loads(line) for line in (out / "replies.jsonl").read_text().splitlines()]
    assert [(r["setting"], r["index"], r["draw"]) for r in replies] == [
        (st, i, d) for st in ("baseline", "spec") for i in range(2) for d in range(3)]
    data = json.loads((out / "eval.json").read_text())
    assert data["config"]["prompts"] == 2 and data["config"]["samples"] == 3
    (row,) = [r for r in data["table"] if r["row"] == "tokens (mean)"]
    tokens = [[r["completion_tokens"] for r in replies[k * 3 : k * 3 + 3]] for k in range(2)]  # baseline, per prompt
    assert row["values"]["baseline"]["n"] == 2
    assert row["values"]["baseline"]["value"] == pytest.approx(np.mean([np.mean(t) for t in tokens]))
    assert "2 prompts x 3 replies" in (out / "eval.md").read_text()


@pytest.mark.slow
def test_server_run_checks_the_local_store_before_generating(eval_home: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Against a server with ``--exact``, the replies are scored on the local store: a vector it lacks is
    refused before any request is sent (here no server listens, so reaching the generation would fail
    otherwise)."""
    monkeypatch.setenv("STEERSERVE_MODELS_DIR", str(models_dir()))
    spec = {"interventions": [{"method": "add", "vector": "only-on-the-server", "coeff": 1.0}]}
    with pytest.raises(SystemExit) as exited:
        main(["eval", "--server", "http://127.0.0.1:9", "--exact", "--spec", json.dumps(spec), "--data",
              str(REPO / "vectors" / "prompts" / "joy.txt"), "--limit", "2", "--max-tokens", "4",
              "--home", str(eval_home), "--out", str(tmp_path / "out"), "--quiet"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "steering.interventions.0.vector" in err and "local store" in err and "--vectors-dir" in err
    assert not (tmp_path / "out").exists()
