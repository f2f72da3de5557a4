"""One settings object, built once from the environment and the CLI, passed explicitly everywhere."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any


def default_vectors_dir() -> Path | None:
    """The repository's ``vectors/`` (the artifacts shipped for the default model), where it exists."""
    repo = Path(__file__).resolve().parents[1] / "vectors"
    return repo if repo.is_dir() else None


def parse_deadline(value: str | None) -> float | None:
    """``STEERSERVE_REQUEST_TIMEOUT`` / ``--request-timeout``: seconds, or ``none`` for no deadline."""
    if value is None or not value.strip():
        return Settings.request_timeout
    return None if value.strip().lower() == "none" else float(value)


def _default_home() -> Path:
    return Path(os.environ.get("STEERSERVE_HOME", Path.home() / ".cache" / "steerserve"))


@dataclass(frozen=True)
class Settings:
    """Everything the server reads at start-up. Nothing else reads the environment."""

    engine: str = "auto"  # "hf", "vllm", or "auto": vllm where it is installed, else hf
    model: Path | None = None  # None: the default model, prepared from its registry package
    model_name: str | None = None  # the name served at /v1/models; defaults to the directory name
    home: Path = field(default_factory=_default_home)  # model cache, artifact store
    host: str = "127.0.0.1"
    port: int = 8000
    admin_key: str | None = None
    # A client API key no policy binds: "reject" (401) or "default" (served under the default policy, for
    # clients that must send some key, such as the official openai client, where no keys are handed out).
    # A client key no policy binds: "auto" serves it under the default policy until an admin binds a first
    # key (as vLLM accepts any key when it has none), then refuses it (401); "reject" / "default" always.
    unknown_keys: str = "auto"
    dtype: str = "float32"
    # Policy limits checked at the edge (spec resolution), before anything is queued.
    max_coeff: float = 100.0
    max_interventions: int = 4
    max_choices: int = 8  # OpenAI's ``n``: completions generated for one request
    # Overload (``admission``): requests queued or generating at once, beyond which a request gets 429 with
    # Retry-After; and a deadline for every request, seconds (a request's own ``timeout`` may set a shorter
    # one; None: none). The deadline is the last guard against a bug that would hold a slot forever.
    max_pending: int = 256
    request_timeout: float | None = 600.0
    # Replicas: a Redis server (``redis://host:6379/0``) holding the per-key rate buckets and the in-flight
    # bound for every replica that names it (None: each process counts alone).
    redis_url: str | None = None
    max_prompt_tokens: int = 2048
    max_tokens_cap: int = 1024
    default_max_tokens: int = 128
    # Edge limits (checked before parsing or tokenising anything): request bodies and prompt text.
    max_body_bytes: int = 4 * 1024 * 1024  # generation and other JSON routes -> 413 beyond it
    max_upload_bytes: int = 64 * 1024 * 1024  # POST /admin/vectors bodies
    max_prompt_chars: int = 65536  # characters of prompt/messages text, checked before tokenising
    max_description_chars: int = 1024  # artifact descriptions
    # Upload vetting: a vector's per-layer norm may be at most this multiple of the model's typical
    # residual-stream norm at that layer (measured once per model, recorded next to the store).
    max_vector_norm_ratio: float = 10.0
    # ... and at its declared strength it may move the first-token distribution of the calibration prompts by
    # at most this mean KL, nats (``methods.vetting``; inf = measure and record, refuse nothing).
    max_upload_kl: float = 4.0
    # A dead engine is restarted in-process this many times (per 10 minutes); beyond that the server
    # exits non-zero so that a supervisor restarts it.
    engine_restarts: int = 3
    # engines
    max_batch: int | None = None  # most sequences decoded together; None: 16 on hf, vLLM's own default on vllm
    bank_slots: int = 4096  # vector-bank rows (row 0 is reserved); requests wait when their vectors do not fit
    # Closed-loop requests (e.g. ``entropic`` with a target) in flight at once: each holds a register slot
    # in the engine; beyond it a request gets 429. Hidden-state captures (actadd pairs, extraction) read at
    # most ``capture_tokens`` prompt tokens per request through the serving engine.
    loop_slots: int = 64
    controller_slots: int = 4  # distinct refusal controllers in flight at once (each slot holds one's weights)
    capture_tokens: int = 1024
    engine_args: Mapping[str, Any] = field(default_factory=dict)  # extra vLLM engine arguments (vllm engine)
    vectors_dir: Path | None = None  # artifacts under this folder are imported at start-up
    models_root: Path | None = None  # where prepared models live; default <home>/models
    # Replicas: a PostgreSQL manifest they share (``postgresql://user:pass@host/db``; None: SQLite under
    # ``store_dir``) and a ``store_dir`` on storage they share (the artifact files); default <home>/store.
    store_url: str | None = None
    store_root: Path | None = None
    # Chat: a Jinja chat template file to use instead of the model's own (as vLLM's ``--chat-template``), and
    # vLLM's tool-call parser (a ``ToolParserManager`` name such as ``hermes``) that reads the tool calls of
    # ``tool_choice: "auto"`` out of the reply (None: "auto" is refused).
    chat_template: Path | None = None
    tool_call_parser: str | None = None

    def __post_init__(self) -> None:
        if self.unknown_keys not in ("auto", "reject", "default"):
            raise ValueError(f"unknown_keys must be 'auto', 'reject' or 'default', not {self.unknown_keys!r}")
        if self.request_timeout is not None and not 0 < self.request_timeout < float("inf"):
            raise ValueError("request_timeout must be a number of seconds > 0 (or 'none' for no deadline)")
        if self.redis_url is not None and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must be a redis://HOST:PORT/DB URL")
        if self.store_url is not None and not self.store_url.startswith(("postgresql://", "postgresql+psycopg://")):
            raise ValueError("store_url must be a postgresql://USER:PASS@HOST/DB URL (unset: the SQLite manifest)")

    @property
    def store_dir(self) -> Path:
        return self.store_root if self.store_root is not None else self.home / "store"

    @property
    def models_dir(self) -> Path:
        return self.models_root if self.models_root is not None else self.home / "models"

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Read STEERSERVE_* variables; explicit overrides (from the CLI) win over the environment."""
        env = os.environ
        s = cls(
            admin_key=env.get("STEERSERVE_ADMIN_KEY") or None,
            unknown_keys=env.get("STEERSERVE_UNKNOWN_KEYS", cls.unknown_keys),
            max_coeff=float(env.get("STEERSERVE_MAX_COEFF", cls.max_coeff)),
            max_interventions=int(env.get("STEERSERVE_MAX_INTERVENTIONS", cls.max_interventions)),
            max_pending=int(env.get("STEERSERVE_MAX_PENDING", cls.max_pending)),
            request_timeout=parse_deadline(env.get("STEERSERVE_REQUEST_TIMEOUT")),
            redis_url=env.get("STEERSERVE_REDIS_URL") or None,
            engine=env.get("STEERSERVE_ENGINE", cls.engine),
            max_batch=int(env["STEERSERVE_MAX_BATCH"]) if env.get("STEERSERVE_MAX_BATCH") else None,
            bank_slots=int(env.get("STEERSERVE_BANK_SLOTS", cls.bank_slots)),
            models_root=Path(env["STEERSERVE_MODELS_DIR"]) if env.get("STEERSERVE_MODELS_DIR") else None,
            store_url=env.get("STEERSERVE_STORE_URL") or None,
            store_root=Path(env["STEERSERVE_STORE_DIR"]) if env.get("STEERSERVE_STORE_DIR") else None,
            chat_template=Path(env["STEERSERVE_CHAT_TEMPLATE"]) if env.get("STEERSERVE_CHAT_TEMPLATE") else None,
            tool_call_parser=env.get("STEERSERVE_TOOL_CALL_PARSER") or None,
            max_body_bytes=int(env.get("STEERSERVE_MAX_BODY_BYTES", cls.max_body_bytes)),
            max_upload_bytes=int(env.get("STEERSERVE_MAX_UPLOAD_BYTES", cls.max_upload_bytes)),
            max_prompt_chars=int(env.get("STEERSERVE_MAX_PROMPT_CHARS", cls.max_prompt_chars)),
            max_vector_norm_ratio=float(env.get("STEERSERVE_MAX_VECTOR_NORM_RATIO", cls.max_vector_norm_ratio)),
            max_upload_kl=float(env.get("STEERSERVE_MAX_UPLOAD_KL", cls.max_upload_kl)),
            engine_restarts=int(env.get("STEERSERVE_ENGINE_RESTARTS", cls.engine_restarts)),
            loop_slots=int(env.get("STEERSERVE_LOOP_SLOTS", cls.loop_slots)),
            controller_slots=int(env.get("STEERSERVE_CONTROLLER_SLOTS", cls.controller_slots)),
        )
        return replace(s, **{k: v for k, v in overrides.items() if v is not None})
