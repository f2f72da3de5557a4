"""The settings an evaluation compares: the baseline (no steering) and the spec at each strength.

Strength rule for ``--coeffs c1 c2 ...``: each value gives one setting, in which every intervention's
strength field is set to it. The strength field is ``--coeff-field NAME`` where given (set in every
intervention that has a numeric ``NAME``), else the first of ``STRENGTH_FIELDS`` that the intervention
has with a numeric value, or for ``sae_feature`` every feature's strength (``features``); interventions
without one (``ablate``) stay as they are. Without ``--coeffs``
the spec is used as is (one steered setting, labelled ``spec``). A ``--coeffs`` value may be ``auto``
(``AUTO``): the strength field is set to the string ``"auto"``, which methods with a calibrated strength
(``cot_compress``'s ``gamma``) accept; such a setting has no numeric ``coeff``.

Side settings (``--also-spec LABEL=SPEC``, ``--also-prompt LABEL=TEMPLATE``, ``--also-temperature
LABEL=T``) come after the sweep: another spec on the same prompts (e.g. a random vector), the unsteered
model on a different prompt template (e.g. a "be concise" instruction), or the unsteered model at another
temperature (sampled at ``T``, and its distributions scored as ``softmax(logits / T)``: the baseline a
method that raises entropy is compared with at equal KL), each reported beside the baseline like any other
setting.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steerserve.errors import SteerError
from steerserve.spec import SteerSpec

STRENGTH_FIELDS = ("coeff", "beta", "gamma", "alpha")
PLACEHOLDER = "{prompt}"  # where a prompt template takes the data item
AUTO = "auto"  # a --coeffs value: the method's calibrated strength
Coeff = float | str  # a number, or AUTO


@dataclass(frozen=True)
class Setting:
    label: str  # "baseline", "coeff=1.5", "coeff=auto", "spec" or a side setting's label
    coeff: float | None  # the swept numeric strength; None for the baseline, auto, an unswept spec, a side setting
    steering: Mapping[str, Any] | None  # the request's ``steering`` object; None = unsteered
    template: str | None = None  # this setting's prompt template; None = the run's (--prompt-template)
    # this setting's temperature, for sampling and for its scored distributions (softmax(logits / T));
    # None = the run's --temperature for sampling, and the model's own distributions (T = 1) for scoring
    temperature: float | None = None


def parse_coeff(text: str) -> Coeff:
    """A ``--coeffs`` value: a number or ``auto`` (argparse ``type``; raises ValueError otherwise)."""
    return AUTO if text.strip().lower() == AUTO else float(text)


def _label(value: Coeff) -> str:
    return f"coeff={value:g}" if isinstance(value, float) else f"coeff={value}"


def load_spec(value: str, flag: str = "--spec") -> dict[str, Any]:
    """``--spec`` (or ``flag``): a JSON file, or the JSON text itself (starting with ``{``), checked for shape."""
    try:
        raw = json.loads(value) if value.lstrip().startswith("{") else json.loads(Path(value).read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise SteerError(f"cannot read a JSON steering spec: {exc}", field=flag) from None
    SteerSpec.from_dict(raw, where=flag)  # shape only; methods are checked against the model later
    if not raw.get("interventions"):
        raise SteerError("has no interventions", field=flag)
    return dict(raw)


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _strength(value: Any) -> bool:
    """A value a strength field may hold: a number, or ``auto`` (a spec written with ``"gamma": "auto"``)."""
    return _numeric(value) or value == AUTO


def _feature_strengths(value: Any) -> bool:
    return isinstance(value, Mapping) and bool(value) and all(_numeric(v) for v in value.values())


def with_strength(spec: Mapping[str, Any], value: Coeff, field: str | None = None) -> dict[str, Any]:
    """``spec`` with its strength field(s) set to ``value`` (the rule in the module docstring)."""
    out = copy.deepcopy(dict(spec))
    changed = 0
    for iv in out["interventions"]:
        keys = [field] if field is not None else list(STRENGTH_FIELDS)
        key = next((k for k in keys if _strength(iv.get(k))), None)
        if key is not None:
            iv[key] = value
            changed += 1
        elif field in (None, "features") and _feature_strengths(iv.get("features")) and _numeric(value):
            iv["features"] = {f: value for f in iv["features"]}  # sae_feature: every named feature
            changed += 1
    if not changed:
        names = field if field is not None else "/".join(STRENGTH_FIELDS)
        raise SteerError(f"no intervention has a numeric {names} to sweep; add one to the spec"
                         + ("" if field is not None else " or name the field with --coeff-field"),
                         field="--coeffs")
    return out


def settings(spec: Mapping[str, Any], coeffs: Sequence[Coeff] | None, field: str | None = None) -> list[Setting]:
    """Baseline first, then one setting per coefficient (or the spec as is)."""
    base = Setting("baseline", None, None)
    if not coeffs:
        return [base, Setting("spec", None, dict(spec))]
    values = [v if v == AUTO else float(v) for v in coeffs]
    if len(set(values)) != len(values):
        raise SteerError("lists a value twice", field="--coeffs")
    return [base, *(Setting(_label(v), v if isinstance(v, float) else None, with_strength(spec, v, field))
                    for v in values)]


def _split(item: str, flag: str) -> tuple[str, str]:
    label, sep, value = item.partition("=")
    if not sep or not label.strip() or not value:
        raise SteerError(f"expects LABEL=VALUE, got {item!r}", field=flag)
    return label.strip(), value


def side_settings(specs: Sequence[str] = (), prompts: Sequence[str] = (),
                  temperatures: Sequence[str] = ()) -> list[Setting]:
    """``--also-spec LABEL=SPEC`` (a spec file or JSON text, run as is), ``--also-prompt LABEL=TEMPLATE``
    (unsteered, with its own prompt template) and ``--also-temperature LABEL=T`` (unsteered, sampled and
    scored at temperature ``T`` > 0), in that order. The label ends at the first ``=``."""
    out = []
    for item in specs:
        label, value = _split(item, "--also-spec")
        out.append(Setting(label, None, load_spec(value, "--also-spec")))
    for item in prompts:
        label, value = _split(item, "--also-prompt")
        check_template(value, "--also-prompt")
        out.append(Setting(label, None, None, value))
    for item in temperatures:
        label, value = _split(item, "--also-temperature")
        out.append(Setting(label, None, None, temperature=parse_temperature(value)))
    return out


def parse_temperature(text: str) -> float:
    """An ``--also-temperature`` value: a finite number > 0 (0 would be greedy, whose distribution is a point)."""
    try:
        t = float(text)
    except ValueError:
        t = math.nan
    if not (math.isfinite(t) and t > 0):
        raise SteerError(f"expects a finite temperature > 0, got {text!r}", field="--also-temperature")
    return t


def check_template(template: str, flag: str) -> str:
    """A prompt template holds ``{prompt}`` exactly once (the data item goes there); returns it."""
    if template.count(PLACEHOLDER) != 1:
        raise SteerError(f"must contain {PLACEHOLDER} exactly once, got {template!r}", field=flag)
    return template


def apply_template(template: str, prompt: str) -> str:
    """``template`` with the prompt in place of ``{prompt}`` (plain replacement: braces in the prompt or
    elsewhere in the template are kept as they are)."""
    return template.replace(PLACEHOLDER, prompt)


def unique_labels(all_settings: Sequence[Setting]) -> list[Setting]:
    """The settings, checked for distinct labels (the report's columns)."""
    labels = [s.label for s in all_settings]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise SteerError(f"two settings are labelled {dup[0]!r}", field="--also-spec")
    return list(all_settings)
