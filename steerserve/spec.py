"""The engine-neutral steering spec: frozen dataclasses built once at the edge, checked before queueing.

A ``SteerSpec`` is a list of interventions, each a method name plus that method's raw parameters. Each
method module parses and validates its own parameters (``methods/<name>.py``); ``methods.resolve`` runs
them all against the loaded model, the artifact store and the policy limits, and returns the primitive
runtime ops. This module imports no method: the data flows spec -> methods -> runtime.
Nothing invalid reaches the engine: every failure is a ``SteerError`` naming the offending field.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from steerserve.config import Settings
from steerserve.errors import SteerError
from steerserve.model_info import ModelInfo
from steerserve.runtime.controller import ControllerWeights
from steerserve.runtime.loop import LoopSpec
from steerserve.runtime.plan import SteerOp
from steerserve.runtime.safeswitch import SafeSwitchSpec

if TYPE_CHECKING:
    from steerserve.store.artifacts import ArtifactStore

# Unsteered hidden states of token sequences: one [len, len(layers), hidden] tensor per sequence.
HiddenStatesFn = Callable[[Sequence[Sequence[int]], Sequence[int]], Awaitable[list[torch.Tensor]]]


@dataclass(frozen=True)
class Intervention:
    method: str
    params: Mapping[str, Any]


@dataclass(frozen=True)
class SteerSpec:
    interventions: tuple[Intervention, ...] = ()

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None, where: str = "steering") -> SteerSpec:
        """Build from the JSON body's ``steering`` object (``{"interventions": [...]}``)."""
        if raw is None:
            return cls()
        if not isinstance(raw, Mapping):
            raise SteerError("must be an object with an 'interventions' list", field=where)
        unknown = set(raw) - {"interventions"}
        if unknown:
            raise SteerError(f"unknown key(s) {sorted(unknown)}", field=where)
        items = raw.get("interventions", [])
        if not isinstance(items, list):
            raise SteerError("must be a list", field=f"{where}.interventions")
        out = []
        for i, item in enumerate(items):
            f = f"{where}.interventions.{i}"
            if not isinstance(item, Mapping):
                raise SteerError("must be an object", field=f)
            method = item.get("method")
            if not isinstance(method, str):
                raise SteerError("is required and must be a string", field=f"{f}.method")
            out.append(Intervention(method, {k: v for k, v in item.items() if k != "method"}))
        return cls(tuple(out))


@dataclass(frozen=True)
class PromptInfo:
    """Where the request's tokens are: needed to turn position rules into absolute positions."""

    token_ids: tuple[int, ...]
    user_start: int  # first token of the (last) user message's content; 0 for raw prompts


@dataclass(frozen=True)
class ResolveContext:
    settings: Settings
    model: ModelInfo
    store: ArtifactStore
    tokenize: Callable[[str], list[int]]  # plain text -> ids, no special tokens
    hidden_states: HiddenStatesFn
    cache: dict[str, Any] = field(default_factory=dict)  # content-hash keyed results (ActAdd vectors)


@dataclass(frozen=True)
class AppliedIntervention:
    """What the response reports back: the method and the artifacts it resolved to."""

    method: str
    artifacts: tuple[str, ...]  # "name@version"
    detail: Mapping[str, Any]
    policy: str | None = None  # set for a policy's mandatory intervention: the policy's name


@dataclass(frozen=True)
class ResolvedSpec:
    ops: tuple[SteerOp, ...]
    applied: tuple[AppliedIntervention, ...]
    loop: LoopSpec | None = None  # at most one closed loop per request
    controller: ControllerWeights | None = None  # at most one refusal controller per request
    safeswitch: SafeSwitchSpec | None = None  # at most one SafeSwitch per request
