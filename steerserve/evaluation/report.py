"""The evaluation's outputs: ``eval.json`` (everything, per sample), ``eval.md`` (the table) and
``eval.png`` (each row's value against the swept strength, with 95% intervals and the baseline as a band).

Both flag a setting whose replies lose the expected format (``format_lost``): a format row's value (the
share of well-formed replies: ``FORMAT_KEYS``) below the baseline's 95% interval, so that a gain bought
with broken answers (an entropy rise from replies that no longer answer with an option) is visible.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from steerserve.evaluation.runner import Result, RowResult

SAMPLE_CHARS = 300  # of each reply, in the printed samples
FORMAT_KEYS = ("well_formed", "log_well_formed", "final_answer")  # per-sample shares of replies in the format


def format_lost(result: Result) -> list[list[str]]:
    """Per setting (baseline first, never flagged): the format rows whose value falls below the baseline's
    95% interval (its lower bound)."""
    out: list[list[str]] = [[] for _ in result.settings]
    for r in result.rows:
        base = r.estimates[0]
        if r.row.key not in FORMAT_KEYS or not math.isfinite(base.lo):
            continue
        for i, e in enumerate(r.estimates[1:], start=1):
            if math.isfinite(e.value) and e.value < base.lo:
                out[i].append(r.row.key)
    return out


def _format_rows(result: Result) -> list[RowResult]:
    return [r for r in result.rows if r.row.key in FORMAT_KEYS]


def _clean(value: Any) -> Any:
    """JSON has no NaN or infinity: null instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def to_json(result: Result, config: Mapping[str, Any]) -> dict[str, Any]:
    labels = [s.label for s in result.settings]
    table = [{"metric": r.metric, "row": r.row.label, "key": r.row.key, "stat": r.row.stat,
              "values": {lab: e.as_dict() for lab, e in zip(labels, r.estimates, strict=True)},
              "delta": {lab: d.as_dict() for lab, d in zip(labels, r.deltas, strict=True) if d is not None}}
             for r in result.rows]
    samples = []
    for j, s in enumerate(result.samples):
        outputs = {lab: {"text": result.replies[i][j].text, "completion_tokens": result.replies[i][j].completion_tokens,
                         "finish_reason": result.replies[i][j].finish_reason, "values": result.values[i][j]}
                   for i, lab in enumerate(labels)}
        samples.append({"index": s.index, "draw": s.draw, "prompt": s.prompt, "reference": s.reference,
                        "outputs": outputs})
    lost = format_lost(result)
    return _clean({"model": result.model, "config": dict(config), "notes": list(result.notes),
                   "settings": [{"label": s.label, "coeff": s.coeff, "steering": s.steering,
                                 "temperature": s.temperature, "format_lost": lost[i]}
                                for i, s in enumerate(result.settings)],
                   "table": table, "samples": samples})


def markdown(result: Result, title: str = "") -> str:
    """``| metric | baseline [CI] | <setting> [CI] ... |``, then the notes."""
    labels = [s.label for s in result.settings]
    lines = [f"**{title}**", ""] if title else []
    lines += ["| metric | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
    for r in result.rows:
        cells = (e.text() + ("" if d is None or d.n == 0 else f" (Δ {d.text(signed=True)})")
                 for e, d in zip(r.estimates, r.deltas, strict=True))
        lines.append(f"| {r.row.label} | " + " | ".join(cells) + " |")
    lost = format_lost(result)
    if _format_rows(result):
        kept = ["(baseline)", *("LOST: " + ", ".join(keys) if keys else "ok" for keys in lost[1:])]
        lines.append("| format kept | " + " | ".join(kept) + " |")
    n = len({s.index for s in result.samples})
    lines += ["", f"{n} prompts; each cell: statistic [bootstrap 95% interval]; values are per-prompt means "
                  "unless the row says otherwise. (Δ ...): the difference to the baseline on the same prompts, "
                  "with its paired bootstrap interval; an effect is significant when it excludes 0."]
    lines += [f"- {note}" for note in result.notes]
    rows = {r.row.key: r for r in _format_rows(result)}
    for i, (st, keys) in enumerate(zip(result.settings, lost, strict=True)):
        if keys:
            why = "; ".join(f"{k} {rows[k].estimates[i].value:.3g} < the baseline's 95% lower bound "
                            f"{rows[k].estimates[0].lo:.3g}" for k in keys)
            lines.append(f"- FORMAT LOST in '{st.label}': {why}: its other changes (an entropy gain, say) come "
                         "with replies that no longer keep the expected format")
    return "\n".join(lines) + "\n"


def samples_text(result: Result, count: int = 3) -> str:
    """The first ``count`` prompts with every setting's reply beside each other (the first draw of each)."""
    out = []
    firsts = [(j, s) for j, s in enumerate(result.samples) if s.draw == 0]
    for j, s in firsts[:count]:
        out.append(f"### prompt {s.index}: {s.prompt[:SAMPLE_CHARS]}")
        for i, st in enumerate(result.settings):
            text = " ".join(result.replies[i][j].text.split())
            out.append(f"  [{st.label}] {text[:SAMPLE_CHARS]}{' ...' if len(text) > SAMPLE_CHARS else ''}")
    return "\n".join(out) + "\n"


def plot(result: Result, path: Path) -> None:
    """One panel per row: steered settings against strength, the baseline as a band."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    steered = result.settings[1:]
    swept = all(s.coeff is not None for s in steered)
    xs = [s.coeff if swept and s.coeff is not None else float(i) for i, s in enumerate(steered)]
    rows: list[RowResult] = list(result.rows)
    cols = min(3, len(rows))
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    for ax, r in zip(axes.flat, rows, strict=False):
        base = r.estimates[0]
        if math.isfinite(base.value):
            ax.axhspan(base.lo, base.hi, color="grey", alpha=0.25, label="baseline 95%")
            ax.axhline(base.value, color="grey", lw=1)
        est = r.estimates[1:]
        ys = [e.value for e in est]
        err = [[max(e.value - e.lo, 0.0) for e in est], [max(e.hi - e.value, 0.0) for e in est]]
        ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, label="steered")
        ax.set_title(r.row.label, fontsize=10)
        ax.set_xlabel("strength" if swept else "setting")
        if not swept:
            ax.set_xticks(xs, [s.label for s in steered])
    for ax in list(axes.flat)[len(rows):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: Result, out: Path, config: Mapping[str, Any], title: str = "") -> list[Path]:
    """Write the three files into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "eval.json", out / "eval.md", out / "eval.png"]
    paths[0].write_text(json.dumps(to_json(result, config), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    paths[1].write_text(markdown(result, title), encoding="utf-8")
    plot(result, paths[2])
    return paths
