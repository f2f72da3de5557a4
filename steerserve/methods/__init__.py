"""The steering methods, registered by name. Adding a method: one module here and one line below."""

from __future__ import annotations

from steerserve.errors import SteerError
from steerserve.methods.ablate import Ablate
from steerserve.methods.actadd import ActAdd
from steerserve.methods.add import Add
from steerserve.methods.base import Compiled, Method
from steerserve.methods.cot_compress import CotCompress

REGISTRY: dict[str, Method] = {m.name: m for m in (Add(), ActAdd(), Ablate(), CotCompress())}


def get_method(name: str, field: str = "method") -> Method:
    try:
        return REGISTRY[name]
    except KeyError:
        raise SteerError(f"unknown method {name!r}; known: {sorted(REGISTRY)}", field=field) from None


__all__ = ["REGISTRY", "Compiled", "Method", "get_method"]
