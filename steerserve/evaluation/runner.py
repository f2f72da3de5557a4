"""One evaluation: generate every setting on the same prompts, score, measure, summarise with intervals.

Generation goes over HTTP (``generate``): to ``--server`` or to the in-process app. Distribution metrics
(``kl``, ``refusal_score``, ``choice_entropy``, ``decision_entropy``) come from the local hf model
(``scoring``, exact) in-process, where it is the serving engine itself, and in server mode with ``exact``
(a local hf service on the same home, model and store, is started for it). In server mode without
``exact`` they come from the server's own top-k log-probabilities (``remote``, approximate): nothing is
loaded locally.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
from tqdm import tqdm

from steerserve.errors import SteerError
from steerserve.evaluation import remote
from steerserve.evaluation.data import Sample
from steerserve.evaluation.generate import Reply, Sampling, body, generate_all, prompt_text
from steerserve.evaluation.metrics import Case, Metric, Probes, Row, get_metrics, make_probes
from steerserve.evaluation.scoring import Scored, ScoreItem, Scorer
from steerserve.evaluation.stats import Estimate, bootstrap, paired_delta, per_prompt
from steerserve.evaluation.sweep import Setting
from steerserve.methods import resolve
from steerserve.service import Service
from steerserve.spec import PromptInfo, SteerSpec

KL_ROW = Row("kl (nats/token)", "kl")
SCORE_CHUNK = 64  # items per scorer call: the progress bar moves, and memory stays bounded


@dataclass(frozen=True)
class Options:
    settings: tuple[Setting, ...]  # baseline first (sweep.settings)
    metrics: tuple[str, ...]
    sampling: Sampling = field(default_factory=Sampling)
    options: tuple[str, ...] = ()  # one-token answer options for choice_entropy
    kl: bool = True
    server: str | None = None  # base URL; None = in-process
    concurrency: int = 16
    seed: int = 0  # bootstrap seed
    progress: bool = True
    home: Path | None = None
    model: Path | None = None
    vectors_dir: Path | None = None  # imported into the local store at start-up
    replies_out: Path | None = None  # JSONL of every reply, written when generation ends (before scoring)
    exact: bool = False  # server mode: score on the local model (else from the server's top-k log-probabilities)
    concept: tuple[str, ...] = ()  # words whose mention ``mentions`` counts


@dataclass(frozen=True)
class RowResult:
    metric: str
    row: Row
    estimates: tuple[Estimate, ...]  # per setting, baseline first
    deltas: tuple[Estimate | None, ...]  # per setting: paired difference to the baseline (None for it)


@dataclass(frozen=True)
class Result:
    settings: tuple[Setting, ...]
    samples: tuple[Sample, ...]
    replies: tuple[tuple[Reply, ...], ...]  # [setting][sample]
    values: tuple[tuple[dict[str, float], ...], ...]  # [setting][sample] per-sample metric values
    rows: tuple[RowResult, ...]
    notes: tuple[str, ...]
    model: str


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


async def _local_service(opts: Options, stack: contextlib.AsyncExitStack) -> Service:
    from steerserve.config import Settings
    from steerserve.service import build_service

    settings = Settings.from_env(engine="hf", home=opts.home, model=opts.model, vectors_dir=opts.vectors_dir)
    service = build_service(settings, _log)
    await service.start()
    stack.push_async_callback(service.stop)
    return service


def _write_replies(path: Path, settings: Sequence[Setting], samples: Sequence[Sample],
                   replies: Sequence[Sequence[Reply]]) -> None:
    """One JSON line per reply, so that a long generation survives a failure (or a long wait) in scoring."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for st, rs in zip(settings, replies, strict=True):
            for sample, r in zip(samples, rs, strict=True):
                f.write(json.dumps({"setting": st.label, "index": sample.index, "draw": sample.draw, "text": r.text,
                                    "completion_tokens": r.completion_tokens, "finish_reason": r.finish_reason,
                                    "report": dict(r.report)}, ensure_ascii=False) + "\n")
    _log(f"wrote {path} ({sum(map(len, replies))} replies)")


async def evaluate(samples: Sequence[Sample], opts: Options) -> Result:
    """Run the whole evaluation; raises SteerError for anything the user can fix."""
    metrics = get_metrics(opts.metrics)
    scored = opts.kl or any(m.scored for m in metrics)
    notes: list[str] = []
    async with contextlib.AsyncExitStack() as stack:
        service: Service | None = None
        if opts.server is None:
            from steerserve.api import create_app

            service = await _local_service(opts, stack)
            transport: httpx.AsyncBaseTransport = httpx.ASGITransport(app=create_app(service, service.settings))
            client = httpx.AsyncClient(transport=transport, base_url="http://steerserve", timeout=None)
        else:
            client = httpx.AsyncClient(base_url=opts.server, timeout=httpx.Timeout(600.0, connect=10.0))
            if scored and opts.exact:
                service = await _local_service(opts, stack)
                await _check_local(service, samples[0], opts)
                notes.append("distribution metrics were scored on the local hf model and store "
                             "(same --home), not on the server (--exact)")
        remote_scored = scored and service is None
        await stack.enter_async_context(client)
        payloads = [body(s, st.steering, opts.sampling, st.template, st.temperature)
                    for st in opts.settings for s in samples]
        n = len(samples)
        tops: list[tuple[remote.TopK, ...]] = []
        if remote_scored:
            pairs = await remote.generate_with_topk(client, payloads, opts.sampling.chat, opts.concurrency,
                                                    opts.progress)
            flat, tops = [r for r, _ in pairs], [t for _, t in pairs]
        else:
            flat = await generate_all(client, payloads, opts.concurrency, opts.progress)
        replies = tuple(tuple(flat[i * n : (i + 1) * n]) for i in range(len(opts.settings)))
        if opts.replies_out is not None:
            _write_replies(opts.replies_out, opts.settings, samples, replies)
        probes = Probes()
        scores: list[list[Scored | None]] = [[None] * n for _ in opts.settings]
        if remote_scored:
            probes, texts = remote.remote_probes(opts.options)
            per_setting = [tops[i * n : (i + 1) * n] for i in range(len(opts.settings))]
            scores = remote.score_all(opts.settings, per_setting, probes, texts, opts.kl,
                                      any(m.along for m in metrics))
            notes.append(remote.NOTE.format(k=remote.CHAT_TOP_K if opts.sampling.chat else remote.RAW_TOP_K))
        elif scored:
            assert service is not None
            probes = make_probes(service.renderer.tokenize, opts.options, opts.sampling.chat)
            along = any(m.along for m in metrics)
            scores = await _score_all(service, samples, replies, opts, probes, notes, along)
        served = sorted({r.model for rs in replies for r in rs})
        model = ", ".join(served) or "?"
        if service is not None and served != [service.info.name]:
            notes.append(f"the server served {model} but the scorer's local model is {service.info.name}: "
                         "the distribution metrics do not describe the generations")
    probes = replace(probes, concept=opts.concept)
    values = tuple(tuple(_sample_values(metrics, samples[j], replies[i][j], scores[i][j], probes, opts.kl)
                         for j in range(n)) for i in range(len(opts.settings)))
    rows = [(m.name, r) for m in metrics for r in m.rows]
    if opts.kl:
        rows.append(("kl", KL_ROW))
    report_keys = sorted({k for rs in replies for r in rs for k in r.report})
    rows += [("report", Row(f"report.{k}", f"report.{k}")) for k in report_keys]
    if not opts.kl:
        notes.append("KL was not measured (--no-kl)")
    draws = 1 + max(s.draw for s in samples)
    if draws > 1:
        notes.append(f"{draws} replies per prompt (seeds {opts.sampling.seed}..{opts.sampling.seed + draws - 1}, "
                     "the same in every setting): each prompt's value is the mean of its replies, and the "
                     "intervals resample prompts")
    prompts = [s.index for s in samples]
    return Result(opts.settings, tuple(samples), replies, values,
                  tuple(_summarise(name, row, values, prompts, opts.seed) for name, row in rows), tuple(notes),
                  model)


def _prompt(service: Service, sample: Sample, opts: Options, setting: Setting) -> PromptInfo:
    """The prompt ``setting``'s reply to ``sample`` was generated for, rendered as the server renders it."""
    text = prompt_text(sample, opts.sampling, setting.template)
    renderer = service.renderer
    return (renderer.render(messages=[{"role": "user", "content": text}])
            if opts.sampling.chat else renderer.render(prompt=text))


async def _check_local(service: Service, sample: Sample, opts: Options) -> None:
    """Before a server run: every setting's spec compiles on the local scorer. A vector that only the
    server holds would otherwise fail the scoring after the whole (long) generation."""
    for setting in opts.settings:
        if setting.steering is not None:
            try:
                await resolve(SteerSpec.from_dict(setting.steering), _prompt(service, sample, opts, setting),
                              service.ctx)
            except SteerError as exc:
                raise SteerError(f"{exc.message} in the local store, which scores the replies (import the "
                                 "server's artifacts with --vectors-dir, or use --home)",
                                 field=exc.field, code=exc.code) from exc


async def _score_all(service: Service, samples: Sequence[Sample], replies: Sequence[Sequence[Reply]],
                     opts: Options, probes: Probes, notes: list[str], along: bool) -> list[list[Scored | None]]:
    """Teacher-force every (setting, sample) on the local model, steered by that setting's spec."""
    from steerserve.engines.hf import HFEngine

    engine = service.engine
    if not isinstance(engine, HFEngine):
        raise RuntimeError("the scorer needs the hf engine")
    scorer = Scorer(engine, service.ctx, probes.ids, option_ids=probes.option_ids if along else ())
    renderer = service.renderer
    items: list[ScoreItem] = []
    gain = False
    for setting, rs in zip(opts.settings, replies, strict=True):
        for sample, reply in zip(samples, rs, strict=True):
            prompt = _prompt(service, sample, opts, setting)  # the prompt the reply was generated for
            ops = (await scorer.resolve(setting.steering, prompt)).ops if setting.steering is not None else ()
            gain = gain or any(op.gain for op in ops)
            cont = tuple(renderer.tokenize(reply.text)) if opts.kl or along else ()
            # the distributions that chose each token, plus the one that chose end-of-sequence
            positions = max(1, len(cont) + (0 if reply.finish_reason == "length" else 1))
            temperature = 1.0 if setting.temperature is None else setting.temperature
            items.append(ScoreItem(prompt, cont, ops, min(positions, len(cont) + 1), temperature))
    if opts.kl or along:
        notes.append("KL and decision entropy are measured along each reply, re-tokenised from its text")
    if gain:
        notes.append("closed-loop (gain) ops were scored at gain 1.0")
    if any(st.temperature is not None for st in opts.settings):
        notes.append("a temperature setting's distribution metrics and KL are those of softmax(logits / T), "
                     "its KL taken to the model's own distribution (T = 1)")
    out: list[Scored] = []
    with tqdm(total=len(items), desc="score", unit="seq", disable=not opts.progress, mininterval=1.0) as bar:
        for k in range(0, len(items), SCORE_CHUNK):
            out += await scorer.score(items[k : k + SCORE_CHUNK], kl=opts.kl)
            bar.update(len(items[k : k + SCORE_CHUNK]))
    n = len(samples)
    return [list(out[i * n : (i + 1) * n]) for i in range(len(opts.settings))]


def _sample_values(metrics: Sequence[Metric], sample: Sample, reply: Reply, scored: Scored | None, probes: Probes,
                   kl: bool) -> dict[str, float]:
    case = Case(sample, reply.text, reply.completion_tokens, reply.finish_reason,
                scored.first if scored is not None else None,
                scored.decisions if scored is not None else None, reply.report)
    out: dict[str, float] = {}
    for m in metrics:
        out.update(m.values(case, probes))
    if kl and scored is not None and scored.kl is not None:
        out["kl"] = sum(scored.kl) / len(scored.kl)
    out.update({f"report.{k}": v for k, v in reply.report.items()})
    return out


def _summarise(metric: str, row: Row, values: Sequence[Sequence[Mapping[str, float]]], prompts: Sequence[int],
               seed: int) -> RowResult:
    nan = float("nan")
    per = [per_prompt([v.get(row.key, nan) for v in vs], prompts) for vs in values]  # [setting][prompt]
    est = tuple(bootstrap(p, row.stat, seed) for p in per)
    deltas = (None, *(paired_delta(p, per[0], row.stat, seed) for p in per[1:]))
    return RowResult(metric, row, est, deltas)


