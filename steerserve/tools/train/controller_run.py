"""The ``train controller`` pipeline: states, stage 1 (``s``), stage 2 (``w``), folding, the validation AUROC
and the choice of ``alpha`` on the selection rows (``controller_cli`` parses the flags and writes the file)."""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from steerserve.anatomy import hf_layers
from steerserve.prompts import PromptRenderer
from steerserve.tools.common import write_bytes
from steerserve.tools.extract.refusal import REFUSALS
from steerserve.tools.train import controller as ct
from steerserve.tools.train import controller_train as tr

WIDTH = 1024  # the paper's hidden width D
GEN_BATCH = 30  # prompts per patched greedy batch
OFF = 1e-9  # a fixed w that is "not this layer": sigmoid(-20.7), nothing in float32 arithmetic


@dataclass(frozen=True)
class Tools:
    """The frozen model and what generating with it needs."""

    model: Any
    renderer: PromptRenderer
    pad: int
    eos: Sequence[int]
    fingerprint: str  # the model's (``ModelInfo.fingerprint``): keys the states cache


@dataclass(frozen=True)
class Result:
    tensors: dict[str, torch.Tensor]  # w1, b1, w2, b2 as stored (raw inputs)
    scales: torch.Tensor  # [N]
    alpha: float
    auroc: float  # validation AUROC of s
    note: str  # how alpha was chosen
    chosen: dict[str, float]  # the chosen alpha's selection figures
    provenance: dict[str, Any]


def fit_and_select(args: argparse.Namespace, tools: Tools, rows: dict[str, list[tuple[int, ...]]],
                   read_layers: Sequence[int], direction: torch.Tensor, log: Callable[[str], None]) -> Result:
    """Everything between the templated prompts and the artifact's tensors and figures."""
    model, n, k, m = tools.model, args.fit, args.select, args.e2e_prompts
    timings: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = round(time.monotonic() - clock, 1)
        clock = time.monotonic()

    groups = {"fit_harmful": rows["harmful"][:n], "fit_harmless": rows["harmless"][:n],
              "sel_harmful": rows["harmful"][n : n + k], "sel_harmless": rows["harmless"][n : n + k],
              "val_harmful": rows["harmful_val"], "val_harmless": rows["harmless_val"]}
    x = _states(model, groups, read_layers, tools.fingerprint, args.states_cache, log)
    lap("states")

    x_fit = torch.cat([x["fit_harmful"], x["fit_harmless"]])
    y_fit = torch.cat([torch.ones(n), torch.zeros(n)])
    x_sel = torch.cat([x["sel_harmful"], x["sel_harmless"]])
    y_sel = torch.cat([torch.ones(k), torch.zeros(k)])
    std = tr.Standardiser.fit(x_fit)
    torch.manual_seed(args.seed)
    net = tr.Net(x_fit.shape[1], WIDTH, len(hf_layers(model)))
    log(f"stage 1 (s): BCE on {n} + {n} fit rows, AdamW lr {args.lr:g}, batch {args.batch}, {args.epochs} epochs, "
        f"w regulariser {args.reg:g} x mean(logit(w)^2)")
    hist1 = tr.train_scale(net, std(x_fit), y_fit, epochs=args.epochs, lr=args.lr, batch=args.batch, reg=args.reg,
                           seed=args.seed, log=log, x_sel=std(x_sel), y_sel=y_sel)
    lap("stage1")

    harm_p, safe_p = rows["harmful"][:m], rows["harmless"][:m]
    full = [tuple(tools.renderer.tokenize(REFUSALS[i % len(REFUSALS)])) for i in range(m)]
    refusals = full if args.refusal_tokens is None else [r[: args.refusal_tokens + 1] for r in full]  # + token 0
    log(f"stage 2 data: greedy {args.reply_tokens}-token replies to {m} harmless fit prompts...")
    own = [tuple(r) for r in ct.greedy(model, safe_p, args.reply_tokens, tools.pad, tools.eos, batch=GEN_BATCH)]
    keep = [i for i in range(m) if len(own[i]) >= 2]  # reply tokens 1.. must exist
    seqs = [p + r for p, r in zip(harm_p, full, strict=True)] + [safe_p[i] + own[i] for i in keep]
    scales = ct.mean_norms(model, seqs)
    lap("stage2_data")
    hist2: list[dict[str, float]] = []
    if args.w_mode == "end_to_end":
        if args.e2e_init_w is not None:
            _set_w(net, [args.e2e_init_w] * len(scales))
        half = max(args.e2e_batch // 2, 1)
        batches = []
        for i in range(0, m, half):
            hi, si = list(range(i, min(i + half, m))), [j for j in keep if i <= j < i + half]
            prompts = [harm_p[j] for j in hi] + [safe_p[j] for j in si]
            xb = std(torch.cat([x["fit_harmful"][hi], x["fit_harmless"][si]]))
            batches.append(tr.Batch(xb, ct.prefill(model, prompts, tools.pad),
                                    tuple(refusals[j] for j in hi) + tuple(own[j] for j in si),
                                    torch.tensor([True] * len(hi) + [False] * len(si))))
        log(f"stage 2 (w, end to end): {m} harmful (templated refusals) + {len(keep)} harmless (own replies), "
            f"{len(batches)} batches, alpha {args.alpha_train:g}, AdamW lr {args.e2e_lr:g}, L1 on w "
            f"{args.e2e_reg:g}, {args.e2e_epochs} epochs")
        hist2 = tr.train_weights(net, model, batches, alpha=args.alpha_train, direction=direction, scales=scales,
                                 top=read_layers[-1], epochs=args.e2e_epochs, lr=args.e2e_lr, reg=args.e2e_reg,
                                 seed=args.seed, log=log)
    else:
        on = range(len(scales)) if args.fixed_list is None else args.fixed_list
        if not all(0 <= layer < len(scales) for layer in on):
            raise SystemExit(f"--fixed-layers must be in [0, {len(scales)})")
        _set_w(net, [args.fixed_w if layer in on else OFF for layer in range(len(scales))])
        log(f"stage 2 skipped: w fixed at {args.fixed_w:g} on layers {list(on)}, ~0 elsewhere")
    lap("stage2")

    tensors = tr.fold(net, std)
    s_val, _ = tr.gains(tensors, torch.cat([x["val_harmful"], x["val_harmless"]]))
    nv = len(groups["val_harmful"])
    auroc = ct.auroc(s_val[:nv], s_val[nv:])
    s_sel, g_sel = tr.gains(tensors, x_sel)
    log(f"validation AUROC of s: {auroc:.4f} (selection {ct.auroc(s_sel[:k], s_sel[k:]):.4f}); mean s val harmful "
        f"{float(s_val[:nv].mean()):.3f}, harmless {float(s_val[nv:].mean()):.3f}")

    sel_h, sel_s = groups["sel_harmful"], groups["sel_harmless"]
    sweep: dict[float, dict[str, float]] = {}
    samples: dict[float, list[str]] = {}

    def figures(alpha: float, prompts: Sequence[tuple[int, ...]], gains: torch.Tensor, group: str) -> float:
        replies = ct.greedy(model, prompts, args.gen_tokens, tools.pad, tools.eos, gains, alpha, direction, scales,
                            top=read_layers[-1], batch=GEN_BATCH)
        texts = [tools.renderer.decode(r) for r in replies]
        rate, rep = ct.rates(texts)
        sweep.setdefault(alpha, {"alpha": alpha}).update({f"{group}_refusal": round(rate, 4),
                                                          f"{group}_repetition": round(rep, 4)})
        samples.setdefault(alpha, []).extend(t[:240] for t in texts[:2])
        log(f"  alpha {alpha:g}, {len(prompts)} {group} selection prompts: refusal {rate:.3f}, repetition {rep:.3f}")
        return rate

    log(f"choosing alpha among {args.alpha_list} on the selection rows ({args.gen_tokens} greedy tokens, patched)")
    alpha, note = tr.choose_alpha(args.alpha_list, lambda a: figures(a, sel_h, g_sel[:k], "harmful"),
                                  args.min_harmful)
    figures(alpha, sel_s, g_sel[k:], "harmless")
    chosen = sweep[alpha]
    met = chosen["harmless_refusal"] <= args.max_harmless
    note += f"; harmless refusal there {'meets' if met else 'MISSES'} the target <= {args.max_harmless}"
    lap("alpha_sweep")
    provenance = {
        "stage1": {"loss": "BCE(s) + reg * mean(logit(w)^2)", "epochs": args.epochs, "lr": args.lr, "batch": args.batch,
                   "reg": args.reg, "optimizer": "AdamW", "seed": args.seed, "history": _rounded(hist1),
                   "standardisation": "per-feature mean/std of the fit rows, folded into w1/b1"},
        "stage2": {"w_mode": args.w_mode, "fixed_w": args.fixed_w if args.w_mode == "fixed" else None,
                   "fixed_layers": args.fixed_layers if args.w_mode == "fixed" else None,
                   "init_w": args.e2e_init_w if args.w_mode == "end_to_end" else None,
                   "loss": "NLL(reply tokens 1..; harmful: templated refusal, harmless: own greedy reply) per "
                           "group + reg * mean(w); only the w head trained",
                   "prompts": [m, len(keep)], "epochs": args.e2e_epochs, "lr": args.e2e_lr,
                   "batch": args.e2e_batch, "reg": args.e2e_reg, "alpha_train": args.alpha_train,
                   "reply_tokens": args.reply_tokens, "refusal_templates": list(REFUSALS),
                   "refusal_tokens_scored": args.refusal_tokens or "all",
                   "history": _rounded(hist2)},
        "scales": "mean ||h_l[t]|| over tokens 1.. of the stage-2 sequences (prompt + target reply), unpatched",
        "auroc_val": round(auroc, 4), "auroc_selection": round(ct.auroc(s_sel[:k], s_sel[k:]), 4),
        "mean_s": {"val_harmful": round(float(s_val[:nv].mean()), 4),
                   "val_harmless": round(float(s_val[nv:].mean()), 4),
                   "selection_harmful": round(float(s_sel[:k].mean()), 4),
                   "selection_harmless": round(float(s_sel[k:].mean()), 4)},
        "mean_w_selection_harmful": [round(float(v), 4) for v in (g_sel[:k] / s_sel[:k, None]).mean(0)],
        "alpha_sweep": {"gen_tokens": args.gen_tokens, "judge": "evaluation.metrics.is_refusal (substring)",
                        "tried": args.alpha_list, "rows": [sweep[a] for a in sorted(sweep)],
                        "targets": [args.min_harmful, args.max_harmless], "chosen": alpha, "note": note,
                        "samples_at_chosen": samples[alpha]},
        "timings_s": timings,
    }
    return Result(tensors, scales, alpha, auroc, note, chosen, provenance)


def _set_w(net: tr.Net, w: Sequence[float]) -> None:
    """Every prompt's ``w_l = w[l]``: the head's weights zeroed, its biases the logits."""
    with torch.no_grad():
        net.fc2.weight[1:] = 0.0
        net.fc2.bias[1:] = torch.tensor([math.log(v / (1 - v)) for v in w])


def _rounded(history: Sequence[dict[str, float]]) -> list[dict[str, float]]:
    return [{key: round(v, 4) for key, v in row.items()} for row in history]


def _states(model: Any, groups: dict[str, list[tuple[int, ...]]], read_layers: Sequence[int], fingerprint: str,
            cache: Path | None, log: Callable[[str], None]) -> dict[str, torch.Tensor]:
    """``[R, 4H]`` controller inputs per group, read from ``cache`` when it holds exactly these (same model,
    layers and token ids), else computed (and written there)."""
    h = hashlib.sha256(json.dumps([fingerprint, list(read_layers), sorted(groups.items())]).encode()).hexdigest()
    if cache is not None and cache.is_file():
        with safetensors.safe_open(str(cache), framework="pt") as f:
            if (f.metadata() or {}).get("key") == h:
                log(f"states from {cache}")
                return {name: f.get_tensor(name) for name in groups}
    log(f"states of layers {list(read_layers)} at the last prompt token of {sum(map(len, groups.values()))} "
        "prompts...")
    x = {name: ct.prompt_states(model, seqs, read_layers) for name, seqs in groups.items()}
    if cache is not None:
        write_bytes(cache, safetensors.torch.save(x, metadata={"key": h}))
    return x
