"""The one error type that crosses layers. The API edge maps it to a 4xx/5xx with the field named."""

from __future__ import annotations


class SteerError(Exception):
    """A request, spec or artifact was rejected.

    ``field`` is a dotted path to the offending input (``steering.interventions.0.coeff``), so that the
    client can see exactly what to change. ``status`` is the HTTP status the edge should answer with.
    """

    def __init__(self, message: str, *, field: str | None = None, status: int = 400, code: str = "invalid") -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.status = status
        self.code = code

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


class NotFound(SteerError):
    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message, field=field, status=404, code="not_found")


class Conflict(SteerError):
    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message, field=field, status=409, code="conflict")


class EngineUnavailable(SteerError):
    """The engine is down (restarting): a 503 that the edge sends with ``Retry-After``."""

    retry_after = 30  # seconds: a client retrying then waits at most a few rounds for a restart (~70 s on CPU)

    def __init__(self, message: str = "the engine is restarting; retry shortly") -> None:
        super().__init__(message, status=503, code="engine_unavailable")
