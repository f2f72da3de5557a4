"""``steerserve extract ftri``: functional token-routing identification (fTRI, MoTE) of the experts of an MoE
model that a class of prompts uses more than the others, written as an ``expert_set`` artifact.

For each prompt, each expert's routing activation is summed over the prompt's tokens at every MoE layer
(``--by weight``: its top-k routing weights; ``--by count``: how often it is selected), giving an
``[N layers, E experts]`` map (rows of dense layers are 0). The maps are averaged per class; the score is the
target class's mean minus the mean of the other classes' means (each class counts once, whatever its size).
The ``--top-k`` highest positive scores over all (layer, expert) pairs form the set, at most ``E - top_k`` per
layer (so that it can be disabled in mask mode); the whole score table goes into the file.

Routing is captured offline on the transformers model with forward hooks on each MoE layer's router
(``RouterHooks``: transformers 5.x's ``layers[l].mlp.gate`` returns ``(logits, weights, ids)``), which can
also apply a mask row (``runtime.route_op``) to every token, as the serving engines do.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import safetensors.torch
import torch

from steerserve.anatomy import hf_layers
from steerserve.model_info import ModelInfo, MoEInfo
from steerserve.runtime.route_op import masked_routing, merge

Routing = tuple[torch.Tensor, torch.Tensor]  # (weights [T, k] fp32, ids [T, k] int64) of one forward


def router_modules(model: Any, layers: Sequence[int]) -> dict[int, torch.nn.Module]:
    """``{layer: router}`` of a transformers MoE causal LM: the ``mlp.gate`` of each MoE decoder layer."""
    decoder = hf_layers(model)
    out = {}
    for layer in layers:
        gate = getattr(getattr(decoder[layer], "mlp", None), "gate", None)
        if not isinstance(gate, torch.nn.Module):
            raise RuntimeError(f"layer {layer} has no router at mlp.gate (transformers >= 5 MoE layout expected)")
        out[layer] = gate
    return out


class RouterHooks:
    """Forward hooks on every MoE router: each forward's routing is appended to ``records[layer]``; with
    ``masks`` (layer -> mask row ``[>= 2E]``), every token of those layers is routed by ``masked_routing``
    (``merge`` keeps the stock routing where a row is all zero), and the masked routing is what is recorded."""

    def __init__(self, model: Any, moe: MoEInfo, masks: Mapping[int, torch.Tensor] | None = None) -> None:
        self.moe, self.masks = moe, dict(masks or {})
        self.modules = router_modules(model, moe.layers)
        self.records: dict[int, list[Routing]] = {layer: [] for layer in moe.layers}
        self._handles: list[Any] = []

    def __enter__(self) -> RouterHooks:
        for layer, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(layer)))
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, layer: int) -> Any:
        row = self.masks.get(layer)

        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            logits, w, ids = output
            if row is not None:
                rows = row.to(logits.device, torch.float32).expand(logits.shape[0], -1)
                w, ids = merge(rows, masked_routing(logits, rows, ids.shape[-1], self.moe.renormalize), (w, ids))
            self.records[layer].append((w.detach().float().cpu(), ids.detach().cpu()))
            return (logits, w, ids) if row is not None else None

        return hook

    def pop(self) -> dict[int, Routing]:
        """The routing of the last forward per layer (cleared): ``layer -> (weights, ids)``."""
        out = {layer: rec[-1] for layer, rec in self.records.items() if rec}
        for rec in self.records.values():
            rec.clear()
        return out


def expert_mass(weights: torch.Tensor, ids: torch.Tensor, num_experts: int, by: str) -> torch.Tensor:
    """``[E]``: per expert, the summed routing weight (``weight``) or selection count (``count``) over tokens."""
    values = weights.float().flatten() if by == "weight" else torch.ones(ids.numel())
    return torch.zeros(num_experts).index_add_(0, ids.flatten().long(), values)


@torch.no_grad()
def route_prompts(model: Any, info: ModelInfo, prompts: Sequence[Sequence[int]], by: str) -> torch.Tensor:
    """``[P, N, E]``: each prompt's per-layer expert mass (``expert_mass``) over its tokens, one prompt a forward."""
    moe = info.moe
    assert moe is not None
    out = torch.zeros(len(prompts), info.num_layers, moe.num_experts)
    device = next(model.parameters()).device
    with RouterHooks(model, moe) as hooks:
        for i, ids in enumerate(prompts):
            model(torch.tensor([list(ids)], device=device))
            for layer, (w, sel) in hooks.pop().items():
                out[i, layer] = expert_mass(w, sel, moe.num_experts, by)
    return out


def ftri_scores(maps: torch.Tensor, labels: Sequence[str], target: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """``[N, E]`` target-class mean minus the mean of the other classes' means, and the classes' counts."""
    classes = sorted(set(labels))
    if target not in classes or len(classes) < 2:
        raise ValueError(f"need the target class {target!r} and at least one other; the data has {classes}")
    means = {c: maps[[i for i, lab in enumerate(labels) if lab == c]].mean(dim=0) for c in classes}
    others = [c for c in classes if c != target]
    scores = means[target] - torch.stack([means[c] for c in others]).mean(dim=0)
    return scores, {"target": target, "others": others, "counts": {c: labels.count(c) for c in classes}}


def top_experts(scores: torch.Tensor, moe: MoEInfo, k: int) -> dict[int, list[int]]:
    """The ``k`` highest positive scores over (MoE layer, expert), at most ``E - top_k`` per layer."""
    cap = moe.num_experts - moe.top_k
    ranked = sorted(((float(scores[layer, e]), layer, e) for layer in moe.layers for e in range(moe.num_experts)),
                    key=lambda t: (-t[0], t[1], t[2]))
    out: dict[int, list[int]] = {}
    for score, layer, e in ranked:
        if sum(map(len, out.values())) >= k or score <= 0:
            break
        if len(out.get(layer, [])) < cap:
            out.setdefault(layer, []).append(e)
    return out


def add_ftri(kinds: argparse._SubParsersAction) -> None:
    p = kinds.add_parser("ftri", help="an MoE expert set (fTRI) from labelled prompts",
                         description="Identify the experts a target class of prompts routes to more than the other "
                                     "classes (MoTE's fTRI) and write them as an expert_set artifact.",
                         epilog="example: steerserve extract ftri --model ./my-moe --data labelled.jsonl --field "
                                "prompt --class-field label --target refused --top-k 10 --out refusal-experts"
                                ".safetensors")
    p.add_argument("--model", type=Path, required=True, help="a local transformers MoE model directory")
    p.add_argument("--data", type=Path, required=True,
                   help=".json (list of objects), .jsonl (objects) or a `steerserve eval` report (.json)")
    p.add_argument("--field", default="prompt", help="key of the prompt (default: prompt)")
    p.add_argument("--class-field", default="label",
                   help="key of the class (default: label); for an eval report SETTING.METRIC, e.g. baseline.refusal")
    p.add_argument("--target", required=True, help="the class whose experts to find")
    p.add_argument("--by", choices=("weight", "count"), default="weight",
                   help="sum the routing weights (default) or count the selections")
    p.add_argument("--top-k", type=int, default=10, help="how many (layer, expert) pairs to keep (default: 10)")
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message (chat template)")
    p.add_argument("--limit", type=int, default=None, help="use at most the first N items")
    p.add_argument("--description", default="")
    p.add_argument("--out", type=Path, required=True, help="output .safetensors file")
    p.set_defaults(func=run)


def read_labelled(path: Path, field: str, class_field: str, limit: int | None) -> tuple[list[str], list[str]]:
    """``(prompts, classes)`` of a JSON/JSONL file of objects, or of a ``steerserve eval`` report (a JSON object
    with ``samples``: the class is a setting's metric value, ``--class-field SETTING.METRIC`` such as
    ``baseline.refusal``, as text: ``"1.0"``/``"0.0"``); exits naming the flag when one is missing."""
    from steerserve.evaluation.data import read_items

    raw = json.loads(path.read_text(encoding="utf-8")) if path.suffix == ".json" else None
    if isinstance(raw, dict) and isinstance(raw.get("samples"), list):
        return _from_eval(raw["samples"][:limit] if limit else raw["samples"], class_field)
    prompts, labels = [], []
    for i, item in enumerate(read_items(path)[:limit] if limit else read_items(path)):
        if not isinstance(item, Mapping) or field not in item or class_field not in item:
            raise SystemExit(f"--data item {i} is not an object with {field!r} (--field) and {class_field!r} "
                             "(--class-field)")
        prompts.append(str(item[field]))
        labels.append(str(item[class_field]))
    return prompts, labels


def _from_eval(samples: list[Any], class_field: str) -> tuple[list[str], list[str]]:
    setting, _, metric = class_field.rpartition(".")
    prompts, labels = [], []
    for i, sample in enumerate(samples):
        try:
            value = sample["outputs"][setting]["values"][metric]
        except (KeyError, TypeError):
            raise SystemExit(f"--class-field {class_field!r}: eval sample {i} has no value of metric {metric!r} "
                             f"in setting {setting!r} (use SETTING.METRIC, e.g. baseline.refusal)") from None
        prompts.append(str(sample["prompt"]))
        labels.append(str(float(value)))
    return prompts, labels


def run(args: argparse.Namespace) -> None:
    from steerserve.model import load_hf
    from steerserve.prompts import PromptRenderer
    from steerserve.store.expert_sets import expert_set_header, expert_set_tensors
    from steerserve.tools.common import write_bytes

    if args.top_k < 1:
        raise SystemExit("--top-k must be at least 1")
    prompts, labels = read_labelled(args.data, args.field, args.class_field, args.limit)
    model, tokenizer, info = load_hf(args.model)
    if info.moe is None:
        raise SystemExit(f"--model {args.model} is a dense model ({info.architecture}): fTRI needs an MoE model")
    renderer = PromptRenderer(tokenizer, info.max_model_len)
    ids = [renderer.render(messages=[{"role": "user", "content": p}]).token_ids if args.chat
           else renderer.render(p).token_ids for p in prompts]
    print(f"routing {len(ids)} prompts through {len(info.moe.layers)} MoE layers...", file=sys.stderr)
    try:
        scores, classes = ftri_scores(route_prompts(model, info, ids, args.by), labels, args.target)
    except ValueError as exc:
        raise SystemExit(f"--target: {exc}") from None
    experts = top_experts(scores, info.moe, args.top_k)
    if not experts:
        raise SystemExit(f"no expert scores above 0 for class {args.target!r}: nothing to write")
    provenance = {"command": "steerserve " + shlex.join(sys.argv[1:]), "data": str(args.data), "field": args.field,
                  "class_field": args.class_field, "chat_template": args.chat, "top_k": args.top_k}
    header = expert_set_header(info, args.by, classes, method="ftri", provenance=json.dumps(provenance),
                               description=args.description)
    write_bytes(args.out, safetensors.torch.save(expert_set_tensors(experts, scores), metadata=header))
    shown = "; ".join(f"layer {layer}: {ids_}" for layer, ids_ in sorted(experts.items()))
    print(f"wrote {args.out} ({sum(map(len, experts.values()))} experts; {shown})")
