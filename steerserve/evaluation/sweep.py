"""The settings an evaluation compares: the baseline (no steering) and the spec at each strength.

Strength rule for ``--coeffs c1 c2 ...``: each value gives one setting, in which every intervention's
strength field is set to it. The strength field is ``--coeff-field NAME`` where given (set in every
intervention that has a numeric ``NAME``), else the first of ``STRENGTH_FIELDS`` that the intervention
has with a numeric value; interventions without one (``ablate``) stay as they are. Without ``--coeffs``
the spec is used as is (one steered setting, labelled ``spec``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerserve.errors import SteerError
from steerserve.spec import SteerSpec

STRENGTH_FIELDS = ("coeff", "beta", "gamma")


@dataclass(frozen=True)
class Setting:
    label: str  # "baseline", "coeff=1.5" or "spec"
    coeff: float | None  # the swept strength; None for the baseline and an unswept spec
    steering: Mapping[str, Any] | None  # the request's ``steering`` object; None = unsteered


def load_spec(value: str) -> dict[str, Any]:
    """``--spec``: a JSON file, or the JSON text itself (starting with ``{``), checked for shape."""
    try:
        raw = json.loads(value) if value.lstrip().startswith("{") else json.loads(Path(value).read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise SteerError(f"cannot read a JSON steering spec: {exc}", field="--spec") from None
    SteerSpec.from_dict(raw, where="--spec")  # shape only; methods are checked against the model later
    if not raw.get("interventions"):
        raise SteerError("has no interventions", field="--spec")
    return dict(raw)


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def with_strength(spec: Mapping[str, Any], value: float, field: str | None = None) -> dict[str, Any]:
    """``spec`` with its strength field(s) set to ``value`` (the rule in the module docstring)."""
    out = copy.deepcopy(dict(spec))
    changed = 0
    for iv in out["interventions"]:
        keys = [field] if field is not None else list(STRENGTH_FIELDS)
        key = next((k for k in keys if _numeric(iv.get(k))), None)
        if key is not None:
            iv[key] = value
            changed += 1
    if not changed:
        names = field if field is not None else "/".join(STRENGTH_FIELDS)
        raise SteerError(f"no intervention has a numeric {names} to sweep; add one to the spec"
                         + ("" if field is not None else " or name the field with --coeff-field"),
                         field="--coeffs")
    return out


def settings(spec: Mapping[str, Any], coeffs: Sequence[float] | None, field: str | None = None) -> list[Setting]:
    """Baseline first, then one setting per coefficient (or the spec as is)."""
    base = Setting("baseline", None, None)
    if not coeffs:
        return [base, Setting("spec", None, dict(spec))]
    if len(set(coeffs)) != len(coeffs):
        raise SteerError("lists a value twice", field="--coeffs")
    return [base, *(Setting(f"coeff={c:g}", float(c), with_strength(spec, float(c), field)) for c in coeffs)]
