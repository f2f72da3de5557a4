"""``steerserve train sae`` end to end on a tiny corpus, and the shipped ``vectors/sae_l12.safetensors`` on the real
model: it passes the store's checks, its features are labelled, the start-up import makes it available by
name, and it reconstructs layer 12's residual stream on text it was not trained on."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from steerserve.anatomy import hf_layers
from steerserve.bootstrap import import_vectors
from steerserve.cli import build_parser
from steerserve.model import load_hf, model_info, prepare_default_model
from steerserve.store.artifacts import ArtifactStore
from steerserve.store.db import header_metadata
from steerserve.store.sae import Sae, check_sae
from steerserve.tools.train.sae_data import shared_prefix
from tests.paths import models_dir

if importlib.util.find_spec("sparsify") is None:  # not imported here: serving-side tests stay free of it
    pytest.skip("the train extra (eai-sparsify) is not installed", allow_module_level=True)
SHIPPED = Path(__file__).resolve().parents[1] / "vectors" / "sae_l12.safetensors"
# FVE of the shipped file on TEXTS below (97 tokens of user turns), measured at 0.754 (0.847 on the training
# run's held-out sequences, vectors/README.md); its own features with the decoder rows shuffled give -0.38.
MIN_FVE = 0.6
TEXTS = ("It will rain all day tomorrow, with thunderstorms and strong wind in the forecast.",
         "My grandmother bakes fresh bread and makes a delicious tomato soup with cheese.",
         "Japan, Brazil and Egypt are countries with very different cultures and food.",
         "def add(a, b):\n    return a + b  # a Python function that adds two numbers",
         "If a train travels 60 miles in 1.5 hours, what is its average speed?")


def _model() -> Path:
    return prepare_default_model(models_dir())


@pytest.mark.slow
def test_train_sae_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "tiny.safetensors"
    args = build_parser().parse_args(
        ["train", "sae", "--layer", "3", "--out", str(out), "--model", str(_model()), "--alpaca", "24",
         "--gsm8k", "6", "--generate", "4", "--gen-tokens", "8", "--d-sae", "128", "--k", "8", "--epochs", "3",
         "--batch", "128", "--dead-after", "1000", "--examples", "8", "--hold", "0.1"])
    args.func(args)
    data = out.read_bytes()
    header, loaded = header_metadata(data), safetensors.torch.load(data)
    sae = check_sae(model_info(_model()), header, loaded)
    assert (sae.layer, sae.activation, sae.k, sae.center, sae.d_sae) == (3, "topk", 8, True, 128)
    assert all(t.dtype == torch.float16 for t in loaded.values())
    assert torch.allclose(sae.w_dec.norm(dim=1), torch.ones(128), atol=2e-3)  # sparsify's unit-norm decoder
    figures = json.loads((tmp_path / "tiny.figures.json").read_text())
    assert figures["held_out"]["l0"] <= 8 and 0.1 < figures["held_out"]["fve"] <= 1
    assert figures["corpus"]["sequences"]["generated"] == 4 and figures["layer"] == 3
    # every feature that fires on the corpus is labelled, with text; dead ones are not
    assert sae.labels and all(label.strip() for label in sae.labels.values())
    assert len(sae.labels) >= 128 - figures["held_out"]["dead"]
    assert json.loads(header["provenance"])["held_out"] == figures["held_out"]
    assert (tmp_path / "tiny.figures.md").read_text().startswith("# SAE at layer 3")


@pytest.mark.parametrize(("flags", "message"), [(["--k", "0"], "--k must be at least 1"),
                                               (["--k", "64", "--d-sae", "32"], "--k must be at most --d-sae"),
                                               (["--hold", "1.5"], "--hold in")])
def test_bad_flags_are_refused_before_any_work(tmp_path: Path, flags: list[str], message: str) -> None:
    args = build_parser().parse_args(["train", "sae", "--layer", "3", "--out", str(tmp_path / "x"), *flags])
    with pytest.raises(SystemExit, match=message):
        args.func(args)
    assert not (tmp_path / "x").exists()


def test_serving_never_imports_sparsify() -> None:
    code = ("import sys, steerserve.service, steerserve.api, steerserve.cli, steerserve.bootstrap; "
            "sys.exit('sparsify' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


@torch.no_grad()
def _layer_states(layer: int) -> list[torch.Tensor]:
    """The default model's residual stream after block ``layer`` on each of TEXTS as a user turn (templated),
    without the system prompt's shared prefix (as the SAE was trained)."""
    model, tokenizer, _ = load_hf(_model())
    got: list[torch.Tensor] = []
    handle = hf_layers(model)[layer].register_forward_hook(lambda _m, _i, o: got.append(o[0] if isinstance(o, tuple)
                                                                                        else o))
    seqs = [tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False),
                      add_special_tokens=False)["input_ids"] for t in TEXTS]
    skip = shared_prefix(seqs)
    try:
        rows = []
        for ids in seqs:
            model(input_ids=torch.tensor([ids]))
            rows.append(got.pop()[0, skip:])
    finally:
        handle.remove()
    return rows


@pytest.mark.slow
def test_the_shipped_sae_reconstructs_layer_12_and_is_labelled(tmp_path: Path) -> None:
    info = model_info(_model())
    data = SHIPPED.read_bytes()
    sae: Sae = check_sae(info, header_metadata(data), safetensors.torch.load(data))
    assert (sae.layer, sae.activation, sae.d_sae) == (12, "topk", 4096) and len(data) <= 20 * 2**20
    assert len(sae.labels) >= 0.5 * sae.d_sae
    topics = {label.split(":")[0] for label in sae.labels.values() if ":" in label}
    assert {"food", "weather", "country"} <= topics
    per_text = _layer_states(12)
    x = torch.cat(per_text)
    f = sae.encode(x)
    fve = 1 - float(((f @ sae.w_dec + sae.b_dec - x) ** 2).sum()) / float(((x - x.mean(0)) ** 2).sum())
    assert fve > MIN_FVE, fve
    # the labels mean something: a topic's features fire most (per token) on the text about that topic
    for topic, own in (("weather", 0), ("food", 1), ("country", 2)):
        ids = [i for i, label in sae.labels.items() if label.startswith(topic + ":")]
        per_token = [float(sae.encode(t)[:, ids].sum()) / len(t) for t in per_text]
        assert max(range(len(TEXTS)), key=per_token.__getitem__) == own, (topic, per_token)
    # the start-up import (bootstrap.import_vectors) makes it available by name on a fresh store
    store = ArtifactStore(tmp_path / "store", info)
    try:
        import_vectors(store, SHIPPED.parent, log=lambda _m: None)
        assert store.open_sae("sae_l12").d_sae == 4096
        assert store.load_sae("sae_l12")[1].labels == sae.labels
    finally:
        store.close()
