"""``steerserve eval --server URL`` with no local model or store: distribution metrics from the server's own
top-k log-probabilities (``evaluation.remote``), and the report's flag for a setting that loses the format
(``report.format_lost``). The end-to-end run uses the session's live server: no engine of its own."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from steerserve.cli import main
from steerserve.evaluation import report
from steerserve.evaluation.metrics import Row
from steerserve.evaluation.remote import TopK, kl_coarse, remote_probes
from steerserve.evaluation.runner import Result, RowResult
from steerserve.evaluation.stats import bootstrap, paired_delta
from steerserve.evaluation.sweep import Setting


def _topk(probs: dict[str, float]) -> TopK:
    return TopK({t: math.log(p) for t, p in probs.items()})


def test_coarse_kl_is_a_lower_bound() -> None:
    p = {"a": 0.5, "b": 0.3, "c": 0.15, "d": 0.05}
    q = {"a": 0.2, "b": 0.2, "c": 0.1, "d": 0.5}
    exact = sum(p[t] * math.log(p[t] / q[t]) for t in p)
    top_p, top_q = _topk({"a": 0.5, "b": 0.3}), _topk({"d": 0.5, "a": 0.2, "b": 0.2})
    coarse = kl_coarse(top_p, top_q)  # buckets {a}, {b}, other
    want = 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.2) + 0.2 * math.log(0.2 / 0.6)
    assert coarse == pytest.approx(want) and 0 < coarse <= exact
    assert kl_coarse(top_p, top_p) == pytest.approx(0.0, abs=1e-12)
    hot = top_p.tempered(0.5)  # p^2 over {a, b, other}: 0.25, 0.09, 0.04
    assert math.exp(hot.logprobs["a"]) == pytest.approx(0.25 / 0.38)
    assert hot.other == pytest.approx(0.04 / 0.38)


def test_remote_probes_match_by_text() -> None:
    probes, texts = remote_probes(["A", "B"])
    assert [texts[i] for i in probes.option_ids] == [{"A"}, {"B"}]
    refusal = set().union(*(texts[i] for i in probes.refusal))
    assert {"I", " I", "Sorry", " Unfortunately"} <= refusal and "A" not in refusal
    first = _topk({"A": 0.6, "I": 0.2, " I": 0.1})
    assert math.exp(first.logprob(texts[probes.option_ids[0]])) == pytest.approx(0.6)
    assert first.logprob(texts[probes.option_ids[1]]) == -math.inf  # outside the top-k: probability 0


def test_report_flags_a_setting_that_loses_the_format() -> None:
    base, broken, fine = [1.0, 1.0, 1.0, 0.0, 1.0], [0.0, 0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0, 1.0]
    row = RowResult("choice_entropy", Row("well_formed", "well_formed"),
                    (bootstrap(base), bootstrap(broken), bootstrap(fine)),
                    (None, paired_delta(broken, base), paired_delta(fine, base)))
    settings = (Setting("baseline", None, None), Setting("coeff=4", 4.0, {"interventions": []}),
                Setting("coeff=1", 1.0, {"interventions": []}))
    result = Result(settings, (), (), (), (row,), (), "m")
    assert report.format_lost(result) == [[], ["well_formed"], []]
    md = report.markdown(result)
    assert "| format kept | (baseline) | LOST: well_formed | ok |" in md
    assert "FORMAT LOST in 'coeff=4'" in md
    assert [s["format_lost"] for s in report.to_json(result, {})["settings"]] == [[], ["well_formed"], []]


def test_eval_against_a_server_without_a_local_model(base_url: str, fresh_vector: Callable[[str], dict[str, Any]],
                                                     tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Two prompts, four tokens: the distribution metrics and KL come from the server's top-k, with the
    approximation stated, and nothing local is looked for (empty home and models folder)."""
    fresh_vector("remote-eval")
    empty = tmp_path / "empty"
    empty.mkdir()
    for var in ("STEERSERVE_HOME", "STEERSERVE_MODELS_DIR", "HOME"):
        monkeypatch.setenv(var, str(empty))
    data = tmp_path / "q.txt"
    data.write_text("Is the sky blue? Answer A for yes or B for no, with one letter.\n"
                    "Is fire cold? Answer A for yes or B for no, with one letter.\n")
    out = tmp_path / "out"
    spec = {"interventions": [{"method": "add", "vector": "remote-eval", "layers": [10, 11, 12], "coeff": 1.0}]}
    with pytest.raises(SystemExit) as exited:
        main(["eval", "--server", base_url, "--spec", json.dumps(spec), "--data", str(data), "--max-tokens", "4",
              "--metric", "choice_entropy", "refusal_score", "decision_entropy", "--options", "A", "B",
              "--coeffs", "8", "--out", str(out), "--quiet", "--concurrency", "4"])
    assert exited.value.code == 0, capsys.readouterr().err
    local = [p.relative_to(empty) for p in empty.rglob("*")]  # matplotlib's caches aside
    assert not any(p.parts[0] in ("models", "store") or "steerserve" in p.parts for p in local), local
    result = json.loads((out / "eval.json").read_text())
    table = {r["key"]: r["values"] for r in result["table"]}
    assert {"choice_entropy", "well_formed", "refusal_score", "decision_entropy", "kl"} <= set(table)
    entropy = table["choice_entropy"]["baseline"]["value"]
    assert entropy is not None and 0 <= entropy <= 1
    assert table["kl"]["baseline"]["value"] == 0 and table["kl"]["coeff=8"]["value"] > 0
    assert any("top-20 log-probabilities" in n and "'other' bucket" in n for n in result["notes"])
    assert [s["format_lost"] for s in result["settings"]][0] == []
    md = (out / "eval.md").read_text()
    print(md)  # with -s: the figures
    assert "| format kept | (baseline) |" in md and "top-20" in md
