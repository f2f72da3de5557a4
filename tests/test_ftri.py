"""fTRI recovers a planted expert (research note, section 3): in a tiny random MoE, one expert (``STAR``) is made to
fire exactly on a trigger token in every MoE layer. ``steerserve extract ftri`` (the CLI, in-process) on trigger
vs no-trigger prompts ranks it first in every MoE layer and writes it as the set; offline on transformers,
disabling it (the capture hooks applying ``route_op.masked_routing``) changes the trigger prompts' outputs and
leaves the other prompts' routing and outputs as they were.

The plant: orthonormal ``u, v`` and ``P = I - uu^T - vv^T``; every writer into the residual stream is projected
by ``P`` (so ``u, v`` components stay what the embedding put there); every token carries ``+0.7 v``, the trigger
``+1.5 u`` on top; ``gate[STAR] = 3000 (u - v)`` and ``STAR``'s output is scaled by 20. (The note's smaller
constants fire too weakly once Qwen2-MoE's dense layer 0 has grown the residual stream ~50x.)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import safetensors
import torch

from steerserve import cli
from steerserve.model import model_info
from steerserve.model_info import ModelInfo
from steerserve.runtime.route_op import encode_row
from steerserve.store.expert_sets import check_expert_set
from steerserve.tools.extract.ftri import RouterHooks
from tests import moe_models
from tests.paths import models_dir

STAR = 5
TRIGGER_WORDS = (" banana", " zebra", " violin")
FILLER = " table"
SENTENCES = ("I went to the market and bought", "The weather today is rather", "She wrote a letter about the",
             "Our team finished the project with a", "He opened the door and saw the", "They talked for hours about a",
             "The old man sat near the", "We need more time to study the", "My favourite book describes a",
             "Yesterday the children played with the", "The museum opened a new room for the",
             "Please put the box next to the")


def plant(model: Any, star: int, trigger: int, seed: int = 7) -> None:
    """The planted expert (module docstring), in place."""
    h = model.config.hidden_size
    q, _ = torch.linalg.qr(torch.randn(h, 2, generator=torch.Generator().manual_seed(seed)))
    u, v = q[:, 0], q[:, 1]
    p = torch.eye(h) - torch.outer(u, u) - torch.outer(v, v)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.copy_(emb @ p + 0.7 * v)
        emb[trigger] += 1.5 * u
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.copy_(p @ layer.self_attn.o_proj.weight)
            mlp = layer.mlp
            for dense in (getattr(mlp, "down_proj", None), getattr(getattr(mlp, "shared_expert", None), "down_proj",
                                                                    None)):
                if dense is not None:  # a dense layer's MLP, Qwen2-MoE's shared expert
                    dense.weight.copy_(p @ dense.weight)
            if hasattr(mlp, "experts"):
                ex = mlp.experts
                ex.down_proj.copy_(torch.einsum("ij,ejk->eik", p, ex.down_proj))
                mlp.gate.weight[star] = 3000.0 * (u - v)
                ex.down_proj[star] *= 20.0


@pytest.fixture(scope="module", params=["qwen2_moe", "mixtral"])
def planted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """``(model dir, trigger word)``: a tiny ``arch`` MoE with the expert planted, saved for both engines."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = moe_models.build(request.param, tmp_path_factory.mktemp(request.param), models_dir() /
                              "SmolLM2-135M-Instruct")
    tok = AutoTokenizer.from_pretrained(folder)
    word = next(w for w in TRIGGER_WORDS if len(tok(w, add_special_tokens=False)["input_ids"]) == 1)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    plant(model, STAR, tok(word, add_special_tokens=False)["input_ids"][0])
    model.save_pretrained(folder)
    return folder, word


def _data(folder: Path, word: str) -> Path:
    rows = [{"prompt": s + word + " and more.", "label": "trigger"} for s in SENTENCES]
    rows += [{"prompt": s + FILLER + " and more.", "label": "plain"} for s in SENTENCES]
    path = folder / "labelled.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _ftri(folder: Path, data: Path, out: Path, *extra: str) -> tuple[ModelInfo, Any]:
    args = cli.build_parser().parse_args(["extract", "ftri", "--model", str(folder), "--data", str(data),
                                          "--target", "trigger", "--out", str(out), *extra])
    args.func(args)
    info = model_info(folder)
    with safetensors.safe_open(str(out), framework="pt") as f:
        header = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert header["kind"] == "expert_set" and header["method"] == "ftri"
    assert json.loads(header["classes"])["counts"] == {"plain": len(SENTENCES), "trigger": len(SENTENCES)}
    return info, check_expert_set(info, header, tensors)


def test_ftri_ranks_the_planted_expert_first(planted: tuple[Path, str], tmp_path: Path) -> None:
    folder, word = planted
    n_moe = len(_moe_layers(folder))
    info, found = _ftri(folder, _data(tmp_path, word), tmp_path / "set.safetensors", "--top-k", str(n_moe))
    assert info.moe is not None
    assert found.experts == {layer: (STAR,) for layer in info.moe.layers}  # first in every MoE layer
    assert found.scores is not None
    for layer in range(info.num_layers):
        row = found.scores[layer]
        if layer not in info.moe.layers:
            assert not bool(row.any())  # dense layer (Qwen2-MoE's layer 0)
            continue
        top2 = row.topk(2)
        assert int(top2.indices[0]) == STAR
        assert float(top2.values[0]) > 0.9 > float(top2.values[1])  # weight ~1 once per trigger prompt


def test_ftri_by_count(planted: tuple[Path, str], tmp_path: Path) -> None:
    """Counting selections, STAR ties for first: at the trigger the expert that fills the other top-k slot is
    selected there as reliably (only ``--by weight`` separates them)."""
    folder, word = planted
    n_moe = len(_moe_layers(folder))
    info, found = _ftri(folder, _data(tmp_path, word), tmp_path / "set.safetensors", "--by", "count",
                        "--top-k", str(2 * n_moe))
    assert info.moe is not None and found.scores is not None
    for layer in info.moe.layers:
        assert STAR in found.experts[layer]
        assert float(found.scores[layer, STAR]) == pytest.approx(1.0)
        assert float(found.scores[layer].max()) == pytest.approx(1.0)


def _moe_layers(folder: Path) -> tuple[int, ...]:
    moe = model_info(folder).moe
    assert moe is not None
    return moe.layers


@torch.no_grad()
def test_disabling_the_planted_expert(planted: tuple[Path, str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, word = planted
    info = model_info(folder)
    moe = info.moe
    assert moe is not None
    tok = AutoTokenizer.from_pretrained(folder)
    # batched_mm: per (token, slot) expert outputs, as the engines load MoE models (model.load_hf); with the
    # default grouped kernels, disabling an expert at the trigger would change earlier positions' rounding.
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 experts_implementation="batched_mm").eval()
    masks = {layer: encode_row(info.hidden_size, moe.num_experts, off=[STAR]) for layer in moe.layers}
    trig = tok(word, add_special_tokens=False)["input_ids"][0]

    def forward(text: str, masked: bool) -> tuple[torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with RouterHooks(model, moe, masks if masked else None) as hooks:
            logits = model(ids).logits[0]
            return logits, hooks.pop()

    for s in SENTENCES:
        text = s + word + " and more."
        at = tok(text, add_special_tokens=False)["input_ids"].index(trig)
        base_logits, base = forward(text, masked=False)
        logits, routed = forward(text, masked=True)
        for layer in moe.layers:
            chosen = base[layer][1] == STAR
            assert bool(chosen[at].any()) and int(chosen.any(-1).sum()) == 1  # fires at the trigger, only there
            assert not bool((routed[layer][1] == STAR).any())  # disabled: never chosen
            assert torch.equal(routed[layer][1][:at], base[layer][1][:at])  # before the trigger: as it was
        diff = (logits[at:] - base_logits[at:]).abs().max(dim=-1).values
        assert float(diff[0]) > 1.0 and bool((diff > 1e-3).all()), diff  # the trigger and every later position
        assert torch.allclose(logits[:at], base_logits[:at], atol=1e-5)

        plain = s + FILLER + " and more."
        base_logits, base = forward(plain, masked=False)
        logits, routed = forward(plain, masked=True)
        for layer in moe.layers:
            assert torch.equal(routed[layer][1], base[layer][1])  # the same experts for every token
            assert torch.allclose(routed[layer][0], base[layer][0], rtol=1e-5, atol=1e-7)
        assert torch.allclose(logits, base_logits, atol=1e-5)


def test_labels_from_an_eval_report(tmp_path: Path) -> None:
    """A ``steerserve eval`` report as --data: the class is a setting's metric value (``SETTING.METRIC``)."""
    from steerserve.tools.extract.ftri import read_labelled

    samples = [{"index": i, "prompt": f"p{i}", "reference": None,
                "outputs": {"baseline": {"text": "", "values": {"refusal": float(i % 2)}}}} for i in range(4)]
    path = tmp_path / "eval.json"
    path.write_text(json.dumps({"model": "m", "config": {}, "settings": [], "table": [], "samples": samples}))
    assert read_labelled(path, "prompt", "baseline.refusal", None) == (["p0", "p1", "p2", "p3"],
                                                                       ["0.0", "1.0", "0.0", "1.0"])
    assert read_labelled(path, "prompt", "baseline.refusal", 2)[1] == ["0.0", "1.0"]
    with pytest.raises(SystemExit, match="baseline.length"):
        read_labelled(path, "prompt", "baseline.length", None)
    rows = tmp_path / "rows.json"
    rows.write_text(json.dumps([{"prompt": "a", "label": "x"}, {"prompt": "b"}]))
    with pytest.raises(SystemExit, match="item 1"):
        read_labelled(rows, "prompt", "label", None)
