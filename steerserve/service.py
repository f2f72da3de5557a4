"""The glue between the HTTP edge and the engine: render prompt -> resolve spec -> queue -> stream.

Everything here is engine-neutral and framework-free; ``api/`` calls it with plain values.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import uuid
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from steerserve.admission import Admission
from steerserve.config import Settings
from steerserve.engines.base import Engine, GenerationOutput, GenerationRequest, SamplingParams, Structured
from steerserve.engines.slots import LoopSlots
from steerserve.engines.supervisor import EngineSupervisor
from steerserve.engines.switching import switching
from steerserve.errors import EngineUnavailable, NotFound, SteerError
from steerserve.features import read_features
from steerserve.fleet import SharedLimits, namespace
from steerserve.methods import check_policy, resolve, vetting
from steerserve.methods.actadd import MAX_PAIR_TOKENS
from steerserve.methods.base import coeff_value
from steerserve.methods.vetting import KLBudget
from steerserve.model_info import ModelInfo
from steerserve.prompts import PromptRenderer
from steerserve.runtime.plan import SteerOp
from steerserve.spec import PromptInfo, ResolveContext, ResolvedSpec, SteerSpec
from steerserve.store.artifacts import ArtifactMeta, ArtifactStore, Vet
from steerserve.store.policies import DEFAULT, Policy, PolicyStore, key_hash
from steerserve.store.sae import Sae
from steerserve.store.sae_labels import LabelIndex, read_labels
from steerserve.store.uploads import Declared
from steerserve.tools import norms
from steerserve.tools.extract.mean_diff import Pooling, mean_difference

MAX_LOGPROBS = 20  # most alternatives per token (vLLM's default ``max_logprobs``)


class _LRU(OrderedDict[str, Any]):
    """Bounded cache for computed vectors (ActAdd differences), keyed by content hash."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


@dataclass(frozen=True)
class Submitted:
    request_id: str
    prompt: PromptInfo
    resolved: ResolvedSpec
    outputs: AsyncGenerator[GenerationOutput, None]


class Service:
    def __init__(self, settings: Settings, engine: Engine, store: ArtifactStore, renderer: PromptRenderer) -> None:
        self.settings, self.engine, self.store, self.renderer = settings, engine, store, renderer
        self.supervisor = EngineSupervisor(engine, settings.engine_restarts)
        self.loops = LoopSlots(settings.loop_slots)
        shared = None
        if settings.redis_url is not None:  # one set of limits for every replica of this deployment
            shared = SharedLimits(settings.redis_url, namespace(settings.store_url or str(settings.store_dir)))
        self.admission = Admission(settings.max_pending, shared=shared)
        self.policies = PolicyStore(store.engine)
        # The vetting's prompts and their unsteered first-token log-probabilities (``methods.vetting``).
        self._calibration: tuple[list[tuple[int, ...]], list[torch.Tensor]] | None = None
        self._calibration_lock = asyncio.Lock()
        self._sae: tuple[str, Sae] | None = None  # (sha256, dictionary) last read by ``features``
        self.ctx = ResolveContext(settings, engine.info, store, renderer.tokenize, engine.hidden_states,
                                  cache=_LRU(256))

    @property
    def info(self) -> ModelInfo:
        return self.engine.info

    async def start(self) -> None:
        """Start the engine and the supervisor that restarts it if it dies (``engines.supervisor``); a Redis
        the settings name must answer first."""
        shared = self.admission.shared
        if shared is not None:
            try:
                await shared.ping()
            except Exception as exc:
                raise RuntimeError(f"the Redis server at --redis-url {shared.url} does not answer: {exc}") from exc
        await self.engine.start()
        self.supervisor.start()

    async def stop(self) -> None:
        await self.supervisor.stop()
        await self.engine.stop()
        if self.admission.shared is not None:
            await self.admission.shared.close()

    async def healthy(self) -> bool:
        return not self.supervisor.restarting and await self.engine.health()

    def sampling(self, *, max_tokens: int | None, temperature: float | None, top_p: float | None,
                 seed: int | None, stop: str | Sequence[str] | None, ignore_eos: bool = False,
                 presence_penalty: float | None = None, frequency_penalty: float | None = None,
                 logit_bias: Mapping[str, float] | None = None, logprobs: int | None = None,
                 structured: Structured | None = None) -> SamplingParams:
        """Checked sampling parameters (field names as in the request body)."""
        s = self.settings
        mt = s.default_max_tokens if max_tokens is None else max_tokens
        if not 1 <= mt <= s.max_tokens_cap:
            raise SteerError(f"must be between 1 and {s.max_tokens_cap}", field="max_tokens")
        temp = 1.0 if temperature is None else temperature
        if not 0.0 <= temp <= 5.0:
            raise SteerError("must be between 0 and 5", field="temperature")
        tp = 1.0 if top_p is None else top_p
        if not 0.0 < tp <= 1.0:
            raise SteerError("must be in (0, 1]", field="top_p")
        if seed is not None and not -(2**63) <= seed < 2**63:
            raise SteerError("must fit in a signed 64-bit integer", field="seed")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        if len(stops) > 4 or any(not x for x in stops):
            raise SteerError("at most 4 non-empty strings", field="stop")
        penalties = {}
        for key, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
            if value is not None and not -2.0 <= value <= 2.0:  # OpenAI's range (NaN fails it too)
                raise SteerError("must be between -2 and 2", field=key)
            penalties[key] = value or 0.0
        if logprobs is not None and not 0 <= logprobs <= MAX_LOGPROBS:
            raise SteerError(f"must be between 0 and {MAX_LOGPROBS}", field="logprobs")
        if structured is not None and not getattr(self.engine, "structured_outputs", False):
            raise SteerError("structured output needs the vllm engine (vLLM's own guided decoding); this server "
                             "runs the hf engine", field=structured.field, code="unsupported_value")
        return SamplingParams(mt, temp, tp, seed, stops, ignore_eos, logit_bias=self._logit_bias(logit_bias),
                              logprobs=logprobs, structured=structured, **penalties)

    def _logit_bias(self, bias: Mapping[str, float] | None) -> tuple[tuple[int, float], ...]:
        """OpenAI's ``logit_bias`` (token id as a string -> bias in [-100, 100], at most 300) as pairs."""
        if not bias:
            return ()
        if len(bias) > 300:
            raise SteerError("at most 300 tokens", field="logit_bias")
        out = []
        for key, value in bias.items():
            if not (key.isdigit() and int(key) < self.info.vocab_size):
                raise SteerError(f"must be a token id below {self.info.vocab_size}", field=f"logit_bias.{key}")
            if not isinstance(value, int | float) or not -100.0 <= value <= 100.0:
                raise SteerError("must be a number between -100 and 100", field=f"logit_bias.{key}")
            out.append((int(key), float(value)))
        return tuple(out)

    def render(self, prompt: str | None = None, messages: Sequence[Mapping[str, Any]] | None = None,
               tools: Sequence[Mapping[str, Any]] | None = None) -> PromptInfo:
        if tools:
            return self.renderer.render(prompt, messages, tools=tools)
        return self.renderer.render(prompt, messages)

    async def submit(self, prompt: PromptInfo, sampling: SamplingParams, steering: Mapping[str, Any] | None,
                     request_id: str | None = None, policy: Policy | None = None,
                     timeout: float | None = None) -> Submitted:
        """Resolve the steering against model, store and ``policy`` (None: unrestricted, for in-process
        callers; the HTTP edge always passes one), then queue, with a deadline of ``timeout`` seconds (or the
        server's, if shorter). Raises SteerError (4xx, 403 for what the policy forbids, 429 when the server is
        at ``max_pending``, or 503 ``EngineUnavailable`` while the engine is down)."""
        if timeout is not None and not (math.isfinite(timeout) and timeout > 0):
            raise SteerError("must be a number of seconds > 0", field="timeout")
        limits = [t for t in (timeout, self.settings.request_timeout) if t is not None]
        self.admission.check()  # before any work: an overloaded server refuses at once
        if not await self.healthy():
            raise EngineUnavailable()
        spec = SteerSpec.from_dict(steering)
        resolved = await resolve(spec, prompt, self.ctx, policy=policy)
        rows = sum(v.rows for v in {op.vector.key: op.vector for op in resolved.ops}.values())
        capacity = getattr(self.engine, "bank_capacity", None)
        if capacity is not None and rows > capacity:
            raise SteerError(f"needs {rows} vector-bank rows; the server's bank holds {capacity}", field="steering")
        if len(prompt.token_ids) + sampling.max_tokens > self.info.max_model_len:
            raise SteerError(f"prompt + max_tokens exceeds the model's context of {self.info.max_model_len}",
                             field="max_tokens")
        rid = request_id or uuid.uuid4().hex
        request = GenerationRequest(rid, prompt.token_ids, sampling, resolved.ops, resolved.loop, resolved.controller)
        ss = resolved.safeswitch
        deadline = min(limits) if limits else None
        member = await self.admission.enter(deadline)  # counted from here (in the fleet too, with Redis)
        try:
            # With SafeSwitch the pilot is held back, and a flagged request is generated again with the head.
            outputs = self.engine.generate(request) if ss is None else switching(self.engine, request, ss)
            # (SafeSwitch's probes write into a cell too)
            held = self._holding_cell(rid, outputs, request.needs_cell or ss is not None)
        except BaseException:
            self.admission.cancel(member)
            raise
        return Submitted(rid, prompt, resolved, self.admission.holding(held, deadline, member))

    async def policy_for(self, key: str | None) -> Policy:
        """The policy of a request with client ``key``: ``default`` without one (the admin key counts as
        none); a key no policy binds is a 401, or the default policy with ``unknown_keys="default"``, or with
        ``"auto"`` (the default) until a first key is bound, ever: revoking every key does not reopen it."""
        policy = await self._find_policy(key)
        # Each key has its own bucket (keyless requests share one): 429 with Retry-After beyond its rate.
        await self.admission.check_rate("" if key is None else key_hash(key), policy.requests_per_minute)
        return policy

    async def _find_policy(self, key: str | None) -> Policy:
        admin = self.settings.admin_key
        if key is None or (admin is not None and hmac.compare_digest(key.encode(), admin.encode())):
            return await asyncio.to_thread(self.policies.get, DEFAULT)
        policy = await asyncio.to_thread(self.policies.policy_for_key, key)
        if policy is not None:
            return policy
        mode = self.settings.unknown_keys
        if mode == "default" or (mode == "auto" and not await asyncio.to_thread(self.policies.closed)):
            return await asyncio.to_thread(self.policies.get, DEFAULT)
        raise SteerError("unknown API key: send 'Authorization: Bearer <key>' with a key an admin bound to a policy, "
                         "or no Authorization header for the default policy", status=401, code="invalid_api_key")

    async def put_policy(self, policy: Policy, *, replace: bool) -> tuple[Policy, bool]:
        """Store ``policy`` once its methods exist and its mandatory interventions resolve on a short chat
        prompt (400 naming the field otherwise; nothing is written). Returns it as stored and whether new."""
        probe = await asyncio.to_thread(self.render, None, [{"role": "user", "content": "Hello."}])
        await check_policy(policy, probe, self.ctx)
        return await asyncio.to_thread(self.policies.put, policy, replace=replace)

    def vetter(self) -> Vet:
        """The store's ``vet`` for an upload (called from a worker thread): the KL of what the artifact does at
        its declared strength, measured through the engine on this event loop, then held to the budget."""
        loop, budget = asyncio.get_running_loop(), KLBudget(self.settings.max_upload_kl)

        def vet(declared: Declared) -> dict[str, Any]:
            figures = asyncio.run_coroutine_threadsafe(self._measure_kl(declared), loop).result()
            budget.check(declared.kind, figures)
            return figures

        return vet

    async def _measure_kl(self, declared: Declared) -> dict[str, Any]:
        async with self._calibration_lock:  # the unsteered side is measured once, for every later upload
            if self._calibration is None:
                prompts = [self.render(messages=[{"role": "user", "content": p}]).token_ids for p in norms.PROMPTS]
                self._calibration = (prompts, await vetting.unsteered(self._generate, prompts))
        prompts, base = self._calibration
        return await vetting.measure(self._generate, prompts, declared, base)

    def _generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationOutput, None]:
        """The engine's outputs for an in-process request, holding a register cell if it needs one."""
        return self._holding_cell(request.request_id, self.engine.generate(request), request.needs_cell)

    def _holding_cell(self, request_id: str, outputs: AsyncGenerator[GenerationOutput, None],
                      needs_cell: bool) -> AsyncGenerator[GenerationOutput, None]:
        """``outputs``, holding a register cell for the request's lifetime if it needs one: refused before
        queueing (429) when every cell is taken."""
        if not needs_cell:
            return outputs
        self.loops.check()
        return self.loops.holding(request_id, outputs)

    async def create_pair(self, name: str, positive: str, negative: str, layer: int | None, coeff: float | None,
                          description: str = "") -> ArtifactMeta:
        """Store an ActAdd pair, refusing what no request could ever use: prompts that are blank or longer
        than ``actadd`` accepts, a layer outside the model, a coefficient that is not finite or is over the cap."""
        for key, text in (("positive", positive), ("negative", negative)):
            if not text.strip():
                raise SteerError("must not be blank", field=key)
            if len(text) > 16 * MAX_PAIR_TOKENS:  # before tokenising: bounded work for any input
                raise SteerError(f"is {len(text)} characters; actadd takes at most {MAX_PAIR_TOKENS} tokens",
                                 field=key)
            n = len(await asyncio.to_thread(self.renderer.tokenize, text))
            if n > MAX_PAIR_TOKENS:
                raise SteerError(f"is {n} tokens long; actadd takes at most {MAX_PAIR_TOKENS}", field=key)
        if coeff is not None:
            coeff_value(coeff, self.settings.max_coeff, "coeff")
        return await asyncio.to_thread(self.store.put_pair, name, positive, negative, layer=layer, coeff=coeff,
                                       description=description)

    async def compute_vector(self, name: str, positive: Sequence[str], negative: Sequence[str],
                             layers: Sequence[int] | None, description: str = "",
                             pooling: Pooling = "mean", chat: bool = False) -> ArtifactMeta:
        """Store a mean-difference vector computed from contrastive prompts (see ``tools.extract``).

        ``chat=True`` renders each prompt as a user message with the chat template first.
        """
        for key, prompts in (("positive", positive), ("negative", negative)):
            if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
                raise SteerError("must be a non-empty list of non-empty strings", field=key)
        if pooling not in ("mean", "last"):
            raise SteerError("must be 'mean' or 'last'", field="pooling")
        n = self.info.num_layers
        chosen = list(range(n)) if layers is None else list(layers)
        for i, layer in enumerate(chosen):
            if not 0 <= layer < n:
                raise SteerError(f"layer {layer} is out of range [0, {n - 1}]", field=f"layers.{i}")

        def ids(key: str, prompts: Sequence[str]) -> list[tuple[int, ...]]:
            out = []
            for i, p in enumerate(prompts):
                try:
                    rendered = self.render(messages=[{"role": "user", "content": p}]) if chat else self.render(prompt=p)
                except SteerError as exc:  # name the prompt, not the renderer's own field
                    exc.field = f"{key}.{i}"
                    raise
                out.append(rendered.token_ids)
            return out

        # Tokenising many prompts takes a while: in a thread, so the event loop keeps serving.
        pos_ids = await asyncio.to_thread(ids, "positive", positive)
        neg_ids = await asyncio.to_thread(ids, "negative", negative)
        vectors = await mean_difference(self.engine.hidden_states, pos_ids, neg_ids, chosen, pooling)
        provenance = {"method": "mean_diff", "positive": len(positive), "negative": len(negative),
                      "pooling": pooling, "chat_template": chat, "source": "POST /admin/vectors/compute"}
        return await asyncio.to_thread(self.store.put_vector, name, vectors, method="mean_diff",
                                       provenance=provenance, description=description)

    async def features(self, prompt: PromptInfo, sae_ref: str, top_k: int, reply: Sequence[int] = (),
                       ops: Sequence[SteerOp] = ()) -> dict[str, Any]:
        """The ``top_k`` most active features of the dictionary ``sae_ref`` at every token of ``prompt`` (and of
        its ``reply``): the states read through the engine (a capture request; steered by open-loop ``ops``
        if given, and then unsteered too), encoded on the host (``features.read_features``). Bounded by
        ``capture_tokens`` tokens x ``top_k``."""
        if not await self.healthy():
            raise EngineUnavailable()
        tokens = [*prompt.token_ids, *reply]
        if len(tokens) > self.settings.capture_tokens:
            raise SteerError(f"is {len(tokens)} tokens with the reply; features are read for at most "
                             f"{self.settings.capture_tokens}", field="prompt")
        meta = await asyncio.to_thread(self.store.get, sae_ref, "sae", field="sae", require_enabled=True)
        # The last dictionary read stays in memory (one only: a 131k-feature one is ~600 MB in fp32).
        if self._sae is None or self._sae[0] != meta.sha256:
            self._sae = meta.sha256, (await asyncio.to_thread(self.store.load_sae, meta.ref()))[1]
        sae = self._sae[1]
        table = await read_features(self.engine, sae, tokens, len(prompt.token_ids), top_k,
                                    self.renderer.tokenizer.decode, ops)
        return {"sae": meta.ref(), "layer": sae.layer, "d_sae": sae.d_sae, "tokens": table}

    async def resolved(self, prompt: PromptInfo, steering: Mapping[str, Any] | None,
                       policy: Policy | None) -> ResolvedSpec:
        """``steering`` resolved for ``prompt`` under ``policy``, without generating (a 4xx naming the field)."""
        return await resolve(SteerSpec.from_dict(steering), prompt, self.ctx, policy=policy)

    async def search_features(self, sae_ref: str, query: str, limit: int = 20) -> dict[str, Any]:
        """The features of the dictionary ``sae_ref`` whose label matches ``query``, best first, at most
        ``limit`` (``store.sae_labels``). The labels are read from the file's header, never its weights, once
        per artifact version. 404 for no such dictionary; 400 naming ``q`` or ``limit``."""
        try:
            meta = await asyncio.to_thread(self.store.get, sae_ref, "sae", field="sae", require_enabled=True)
        except SteerError as exc:
            if exc.code in ("unknown_artifact", "wrong_kind"):
                raise NotFound(exc.message, field="sae") from None
            raise
        key = f"sae-labels:{meta.ref()}:{meta.sha256}"
        found = self.ctx.cache.get(key)
        if found is None:
            def read() -> tuple[int, int, LabelIndex]:
                file = self.store.open_sae(meta.ref())
                return file.layer, file.d_sae, LabelIndex.of(read_labels(file))

            found = self.ctx.cache[key] = await asyncio.to_thread(read)
        layer, d_sae, index = found
        matches, total = await asyncio.to_thread(index.search, query, limit)
        out: dict[str, Any] = {"sae": meta.ref(), "layer": layer, "d_sae": d_sae, "q": query, "labelled": len(index),
                               "total": total, "matches": [{"feature": i, "label": label} for i, label in matches]}
        if not len(index):
            out["note"] = f"sae {meta.ref()!r} has no feature labels: search by label finds nothing"
        return out


def build_service(settings: Settings, log: Callable[[str], None] = print) -> Service:
    """The service of ``settings``: model, engine, store and renderer built by ``bootstrap.build_parts``."""
    from steerserve.bootstrap import build_parts  # loads model code: only when a service is built

    return Service(settings, *build_parts(settings, log))
