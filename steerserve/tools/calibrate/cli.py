"""``steerserve calibrate``: store the KL-bounded strength ``gamma_max`` in a one-layer vector artifact.

Over calibration states (the last prompt token of GSM8K questions from rows ``[offset, offset + states)``,
each question in ``--template`` as the user message, chat template applied; the default is the bare
question, ``--template asc`` is the prompt ``extract asc`` builds its vector for) and the unit direction
``u = v / |v|`` at the vector's layer: ``a`` = median ``|J u|``, ``L`` = 95th percentile ``|H[u, u]|``
(``kl_bound``), both measured in the softmax's own geometry (see ``calibrate``), then ``gamma_max`` from
METHODS.md's closed form for ``eps``. The KL it promises is then *measured*: the
next-token distributions at those states with and without ``gamma_max * v`` added.

Units: the file keeps the vector as extracted (unnormalised). ``gamma_max`` multiplies the stored vector,
as ``cot_compress``'s ``gamma`` does; ``gamma_max_unit = gamma_max * vector_norm`` is the same step along
``u``. The result goes into the file's ``calibration`` metadata (JSON); ``--out`` may be the input file.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch

from steerserve.anatomy import hf_layers
from steerserve.tools.gsm8k import DEFAULT_DATA, DataMissing, read_rows, shown

CHUNK = 16  # states per batched pass: bounds the KV cache kept for the nested JVP


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="store the KL-bounded strength (gamma_max) in a vector artifact",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vector", type=Path, required=True, help="a one-layer vector artifact (.safetensors)")
    p.add_argument("--layer", type=int, default=None, help="the layer to calibrate (default: the file's only one)")
    p.add_argument("--eps", type=float, default=1e-3, help="KL budget per token, nats (default: 1e-3)")
    p.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"GSM8K train.jsonl (default: {DEFAULT_DATA})")
    p.add_argument("--offset", type=int, default=1000, help="first calibration row (keep it apart from extraction)")
    p.add_argument("--states", type=int, default=50, help="number of calibration states (rows)")
    p.add_argument("--template", default="{question}",
                   help="user message, with {question}; 'asc' = extract asc's own prompt (default: the bare question)")
    p.add_argument("--kl-at", default="", help="also measure the KL at these gammas (comma-separated, stored units)")
    p.add_argument("--model", type=Path, default=None, help="model directory (default: the default model)")
    p.add_argument("--out", type=Path, required=True, help="output .safetensors file (may be --vector)")
    p.set_defaults(func=run)


def calibrate(model: Any, prompts: list[tuple[int, ...]], pad_id: int, layer: int, v: torch.Tensor, eps: float,
              extra_gammas: tuple[float, ...] = ()) -> dict[str, Any]:
    """``a``, ``L``, ``gamma_max`` (stored units) and the measured KL at it for vector ``v`` at ``layer``.

    ``a = sqrt(2 Var_p[J u])`` and ``L = sqrt(2 Var_p[H[u, u]])``: the derivatives measured in the softmax's
    geometry, where a shift common to all logits counts for nothing (``p`` = the unsteered next-token
    distribution), so that the closed form's quadratic term ``a^2 g^2 / 4`` is the KL's own (METHODS.md's
    check: the measured KL at ``gamma_max`` must come out near ``eps``)."""
    from steerserve.tools.calibrate import kl_bound

    model.set_attn_implementation("eager")  # SDPA has no forward-mode derivative on CPU
    layers = hf_layers(model)
    norm = float(v.norm())
    u = (v / norm).to(next(model.parameters()).dtype)
    a_all: list[float] = []
    l_all: list[float] = []
    raw_a: list[float] = []
    base, fns = [], []
    for i in range(0, len(prompts), CHUNK):
        states = kl_bound.prepare_states(model, prompts[i : i + CHUNK], pad_id)
        f = kl_bound.shifted_logits(model, layers, states, layer, u)
        with kl_bound.twice_differentiable(layers):
            f0, d1, d2 = kl_bound.derivatives(f)
        # A shift common to every logit changes no probability, and on this model it dominates |J u| (by ~400x).
        # With logits moving by d = g J u + g^2/2 H[u, u], the KL is Var_p[d] / 2 to second order in d:
        # g^2 Var_p[J u] / 2 + g^3 Cov_p[J u, H[u, u]] / 2. So a = sqrt(2 Var_p[J u]) makes the closed form's
        # a^2 g^2 / 4 that quadratic term exactly, and L = sqrt(2 Var_p[H[u, u]]) makes a L g^3 / 4 a bound on
        # the cubic one (Cauchy-Schwarz). With plain norms over the vocabulary the measured KL at gamma_max was
        # 6e-9 nats for eps 1e-3 on the shipped ASC vector (and 0 with only ``a`` corrected).
        p = torch.softmax(f0.double(), -1)  # [B, V]
        c1 = d1.double() - (p * d1).sum(-1, keepdim=True)
        c2 = d2.double() - (p * d2).sum(-1, keepdim=True)
        a_all += (2 * (p * c1**2).sum(-1)).sqrt().tolist()
        l_all += (2 * (p * c2**2).sum(-1)).sqrt().tolist()
        raw_a += d1.norm(dim=-1).tolist()
        base.append(f0)
        fns.append(f)
    a, curvature = statistics.median(a_all), float(torch.tensor(l_all).quantile(0.95))
    raw, gmax_unit = kl_bound.solve_gamma(a, curvature, eps)

    def measured(gamma_unit: float) -> dict[str, float]:
        with torch.no_grad():
            kls = torch.cat([kl_bound.kl(f0, f(torch.tensor(gamma_unit))) for f0, f in zip(base, fns, strict=True)])
        return {"mean": float(kls.mean()), "median": float(kls.median()), "p95": float(kls.quantile(0.95)),
                "max": float(kls.max())}

    return {"layer": layer, "eps": eps, "a": a, "L": curvature, "states": len(prompts),
            "a_p5_p95": [float(torch.tensor(a_all).quantile(q)) for q in (0.05, 0.95)],
            "a_plain_norm": statistics.median(raw_a), "gamma_raw_unit": raw, "gamma_max_unit": gmax_unit,
            "vector_norm": norm, "gamma_max": gmax_unit / norm,
            "kl_at_gamma_max": measured(gmax_unit),
            "kl_at": {repr(g): measured(g * norm) for g in extra_gammas},
            "units": "gamma_max multiplies the stored vector; gamma_max_unit = gamma_max * vector_norm, along v/|v|"}


def user_template(name: str) -> str:
    """``--template``: ``asc`` is ``extract asc``'s prompt; anything else is the template itself."""
    from steerserve.tools.extract.asc import TEMPLATE

    return TEMPLATE if name == "asc" else name


def run(args: argparse.Namespace) -> int:
    import safetensors

    from steerserve.bootstrap import model_path
    from steerserve.config import Settings
    from steerserve.model import load_hf
    from steerserve.prompts import PromptRenderer
    from steerserve.tools.common import write_artifact

    def fail(msg: str) -> int:
        print(f"steerserve calibrate: {msg}", file=sys.stderr)
        return 2

    try:
        problems = read_rows(args.data, args.offset, args.states)
    except DataMissing as exc:
        return fail(f"{exc}; nothing done")
    with safetensors.safe_open(str(args.vector), framework="pt") as f:
        header = dict(f.metadata() or {})
        tensors = {int(k.split(".", 1)[1]): f.get_tensor(k).float() for k in f.keys()}  # noqa: SIM118
    layer = args.layer if args.layer is not None else (next(iter(tensors)) if len(tensors) == 1 else None)
    if layer not in tensors:
        return fail(f"give --layer, one of {sorted(tensors)}")
    settings = Settings.from_env(model=args.model)
    model, tokenizer, info = load_hf(model_path(settings), settings.dtype)
    if header.get("model_fingerprint") != info.fingerprint or header.get("kind") != "vector":
        return fail(f"{args.vector} is not a vector artifact for {info.name} (fingerprint {info.fingerprint})")
    renderer = PromptRenderer(tokenizer, settings.max_prompt_tokens)
    template = user_template(args.template)
    if template.count("{question}") != 1:
        return fail(f"--template must contain {{question}} exactly once, got {args.template!r}")
    prompts = [renderer.render(messages=[{"role": "user", "content": template.replace("{question}", p.question)}])
               .token_ids for p in problems]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    extra = tuple(float(g) for g in args.kl_at.split(",") if g.strip())
    print(f"calibrating layer {layer} on {len(prompts)} states (rows {args.offset}..)...", file=sys.stderr)
    cal = calibrate(model, prompts, pad, layer, tensors[layer], args.eps, extra)
    cal.update({"data": shown(args.data), "rows": [problems[0].row, problems[-1].row + 1],
                "positions": "last prompt token; the user message is the template with the question",
                "user_template": template,
                "command": "steerserve " + shlex.join(sys.argv[1:])})
    write_artifact(args.out, tensors, {**header, "calibration": json.dumps(cal)})
    kl_m = cal["kl_at_gamma_max"]
    print(f"a={cal['a']:.4g} L={cal['L']:.4g} gamma_max={cal['gamma_max']:.4g} (unit: {cal['gamma_max_unit']:.4g}, "
          f"|v|={cal['vector_norm']:.4g}); measured KL at gamma_max: mean {kl_m['mean']:.3g}, median "
          f"{kl_m['median']:.3g}, p95 {kl_m['p95']:.3g} nats (eps {args.eps:g})")
    for g, m in cal["kl_at"].items():
        print(f"  KL at gamma {g}: mean {m['mean']:.3g}, median {m['median']:.3g}, p95 {m['p95']:.3g}")
    print(f"wrote {args.out}")
    return 0
