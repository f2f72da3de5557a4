"""Percentile-bootstrap 95% intervals of a statistic (mean, median, p90), seeded so reruns agree.

Per-sample values are resampled with replacement ``n_boot`` times; the interval is the 2.5th and 97.5th
percentiles of the statistic over the resamples. ``paired_delta`` resamples the same prompts for the
steered and the baseline values, which is the right interval for an effect measured on shared prompts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

STATS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    # each reduces the last axis: [..., n] -> [...]
    "mean": lambda a: np.mean(a, axis=-1),
    "median": lambda a: np.median(a, axis=-1),
    "p90": lambda a: np.percentile(a, 90, axis=-1),
}
N_BOOT = 2000


@dataclass(frozen=True)
class Estimate:
    """A statistic and its bootstrap interval; all NaN when there were no values."""

    value: float
    lo: float
    hi: float
    n: int

    def as_dict(self) -> dict[str, float | int | None]:
        def clean(x: float) -> float | None:  # JSON has no NaN
            return None if np.isnan(x) else round(float(x), 6)

        return {"value": clean(self.value), "lo": clean(self.lo), "hi": clean(self.hi), "n": self.n}

    def text(self, digits: int = 3, signed: bool = False) -> str:
        if np.isnan(self.value):
            return "-"
        sign = "+" if signed else ""
        return f"{self.value:{sign}.{digits}g} [{self.lo:{sign}.{digits}g}, {self.hi:{sign}.{digits}g}]"


def _resample_index(n: int, seed: int, n_boot: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # [n_boot, n]


def bootstrap(values: Sequence[float], stat: str = "mean", seed: int = 0, n_boot: int = N_BOOT) -> Estimate:
    """``stat`` of ``values`` with its percentile-bootstrap 95% interval (NaN values, i.e. samples the
    metric does not apply to, are left out)."""
    a = np.asarray(values, dtype=np.float64)
    a = a[~np.isnan(a)]
    if a.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    f = STATS[stat]
    boot = f(a[_resample_index(a.size, seed, n_boot)])  # [n_boot]
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return Estimate(float(f(a)), float(lo), float(hi), int(a.size))


def per_prompt(values: Sequence[float], prompts: Sequence[int]) -> list[float]:
    """The mean of each prompt's values (its draws, in first-seen order; NaNs left out, NaN if all are):
    with several replies per prompt the prompt, not the reply, is the unit the bootstrap resamples."""
    groups: dict[int, list[float]] = {}
    for p, v in zip(prompts, values, strict=True):
        groups.setdefault(p, []).append(v)
    out = []
    for vs in groups.values():
        a = np.asarray(vs, dtype=np.float64)
        a = a[~np.isnan(a)]
        out.append(float(a.mean()) if a.size else float("nan"))
    return out


def paired_delta(steered: Sequence[float], baseline: Sequence[float], stat: str = "mean", seed: int = 0,
                 n_boot: int = N_BOOT) -> Estimate:
    """``stat(steered) - stat(baseline)`` over the same prompts, resampling prompts jointly (prompts with
    a NaN on either side are left out)."""
    s, b = np.asarray(steered, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if s.shape != b.shape:
        raise ValueError("paired values must come from the same prompts")
    keep = ~(np.isnan(s) | np.isnan(b))
    s, b = s[keep], b[keep]
    if s.size == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    f = STATS[stat]
    idx = _resample_index(s.size, seed, n_boot)
    boot = f(s[idx]) - f(b[idx])
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return Estimate(float(f(s) - f(b)), float(lo), float(hi), int(s.size))
