"""The model side of training a refusal controller (``runtime.controller``): states, the patched forward
with autograd, patched greedy generation, and the figures (AUROC, refusal rates).

Everything here runs the frozen transformers model directly (no engine): the end-to-end loss needs
gradients through the forward, which the serving engines never compute. The patch follows the serving
semantics exactly: ``h_l[t] += alpha * g[l] * scales[l] * r`` at the output of block ``l`` (the project's
layer convention, as the hf hooks capture) for every layer of every *generated* position ``t >= P`` and for
the layers above ``top`` (the controller's last read layer ``k``) of the last prompt token ``P - 1``, with
``g = s * w`` the request's gains. The rest of the prompt is never patched; with ``top`` the last layer,
neither is the last prompt token, and the first reply token is picked unpatched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import DynamicCache

from steerserve.anatomy import hf_body, hf_head, hf_layers
from steerserve.evaluation.metrics import is_refusal, repetition
from steerserve.runtime.hooks import Capture


def _right_padded(seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """``[B, S]`` ids, zero-padded after each sequence (causal: padding after a token never reaches it)."""
    ids = torch.zeros(len(seqs), max(len(s) for s in seqs), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(list(s))
    return ids


def prompt_states(model: Any, prompts: Sequence[Sequence[int]], layers: Sequence[int],
                  batch: int = 16) -> torch.Tensor:
    """``[R, len(layers) * H]`` fp32: the states of ``layers`` (concatenated in order) at each prompt's last
    token, unsteered: the controller's input."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths: little padding
    out = torch.empty(0)
    for i in range(0, len(order), batch):
        idx = order[i : i + batch]
        chunk = [prompts[j] for j in idx]
        last = torch.tensor([len(p) - 1 for p in chunk])
        with torch.inference_mode(), Capture(hf_layers(model), layers) as cap:
            hf_body(model)(input_ids=_right_padded(chunk), use_cache=False)
        rows = torch.arange(len(chunk))
        x = torch.cat([cap.outputs[layer][rows, last] for layer in layers], dim=-1).float()  # [b, 4H]
        if not out.numel():
            out = torch.empty(len(prompts), x.shape[1])
        out[idx] = x
    return out


def mean_norms(model: Any, seqs: Sequence[Sequence[int]], batch: int = 16) -> torch.Tensor:
    """``[N]`` mean ``||h_l[t]||`` over tokens 1.. of every sequence at every layer (token 0, the attention
    sink, is an outlier), as a direction's ``scale`` is measured (``tools.refusal.mean_norms``)."""
    n = len(hf_layers(model))
    total, count = torch.zeros(n, dtype=torch.float64), 0
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        with torch.inference_mode(), Capture(hf_layers(model), range(n)) as cap:
            hf_body(model)(input_ids=_right_padded(chunk), use_cache=False)
        for b, s in enumerate(chunk):
            norms = torch.stack([cap.outputs[layer][b, 1 : len(s)].norm(dim=-1) for layer in range(n)])  # [N, T]
            total += norms.double().sum(dim=1)
            count += len(s) - 1
    return (total / count).float()


@contextlib.contextmanager
def patched(model: Any, direction: torch.Tensor, scales: torch.Tensor,
            delta: Callable[[int, torch.Tensor], torch.Tensor | None]) -> Iterator[None]:
    """Within the block, the output of block ``l`` gets ``+ delta(l, h) [B, S, 1] * scales[l] * direction``
    (``delta`` returns None to leave a forward unpatched); gradients flow through ``delta``."""
    r = direction.float()

    def make(layer: int) -> Callable[[nn.Module, Any, Any], Any]:
        def hook(module: nn.Module, args: Any, output: Any) -> Any:
            h = output[0] if isinstance(output, tuple) else output  # [B, S, H]
            d = delta(layer, h)
            if d is None:
                return None
            h = h + d * (scales[layer] * r)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        return hook

    handles = [block.register_forward_hook(make(i)) for i, block in enumerate(hf_layers(model))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class Prefix:
    """Prompts run once, unpatched, left-padded to a common end: the reply forwards continue from here."""

    attn: torch.Tensor  # [B, W] 1 = a prompt token, 0 = left padding (the prompts without their last token)
    lengths: torch.Tensor  # [B] cached lengths (the position id of each row's last prompt token)
    cache: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (keys, values) [B, kv_heads, W, head_dim]
    last: tuple[int, ...]  # each prompt's last token


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, W]`` ids left-padded with ``pad_id`` and the ``[B, W]`` attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros(len(prompts), width, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p):], attn[b, width - len(p):] = torch.tensor(list(p)), 1
    return ids, attn


def prefill(model: Any, prompts: Sequence[Sequence[int]], pad_id: int) -> Prefix:
    """The key/value cache of each prompt but its last token (never patched, so one prefill serves every
    training step; the last token, patched at the layers above the read layers, goes with the reply)."""
    ids, attn = left_padded([p[:-1] for p in prompts], pad_id)
    with torch.inference_mode():
        out = hf_body(model)(input_ids=ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                          past_key_values=DynamicCache(config=model.config), use_cache=True)
    cache = tuple((k.clone(), v.clone()) for k, v, *_ in out.past_key_values)  # plain tensors, reusable
    return Prefix(attn, attn.sum(-1), cache, tuple(p[-1] for p in prompts))


def reply_nll(model: Any, prefix: Prefix, replies: Sequence[Sequence[int]], gains: torch.Tensor, alpha: float,
              direction: torch.Tensor, scales: torch.Tensor, top: int) -> torch.Tensor:
    """``[B]`` mean NLL of each reply (teacher-forced after its prompt) under the serving patch: ``alpha *
    gains[b, l]`` at every layer of every reply position and at the layers above ``top`` (the last read
    layer) of the last prompt token. Reply token 0 is scored only when that token is patched somewhere
    (``top`` below the last layer); differentiable in ``gains [B, N]``."""
    width = 1 + max(len(r) for r in replies)
    ids = torch.zeros(len(replies), width, dtype=torch.long)  # right padding: after the reply, never read
    for b, (last, r) in enumerate(zip(prefix.last, replies, strict=True)):
        ids[b, : 1 + len(r)] = torch.tensor([last, *r])
    attn = torch.cat([prefix.attn, torch.ones_like(ids)], dim=1)
    positions = prefix.lengths[:, None] + torch.arange(width)[None, :]
    generated = (torch.arange(width) >= 1).float()[None, :, None]  # [1, S, 1]: position 0 is the prompt's

    def delta(layer: int, h: torch.Tensor) -> torch.Tensor:
        g = alpha * gains[:, layer, None, None]  # [B, 1, 1]
        return g if layer > top else g * generated

    # position j predicts reply token j (position 0 is the last prompt token)
    first = 0 if top < len(scales) - 1 else 1
    rows = [b for b, r in enumerate(replies) for _ in range(first, len(r))]
    cols = [j for r in replies for j in range(first, len(r))]
    targets = torch.tensor([t for r in replies for t in list(r)[first:]])
    cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in prefix.cache])  # a fresh copy: update() appends
    with patched(model, direction, scales, delta):
        hidden = hf_body(model)(input_ids=ids, attention_mask=attn, position_ids=positions, past_key_values=cache,
                             use_cache=True).last_hidden_state  # [B, 1 + R, H], after the final norm
    logp = torch.log_softmax(hf_head(model)(hidden[rows, cols]).float(), dim=-1)  # [K, V]
    nll = -logp[torch.arange(len(targets)), targets]
    per = torch.zeros(len(replies)).index_add(0, torch.tensor(rows), nll)
    return per / torch.tensor([max(len(r) - first, 1) for r in replies])


def greedy(model: Any, prompts: Sequence[Sequence[int]], max_tokens: int, pad_id: int,
           eos_ids: Sequence[int], gains: torch.Tensor | None = None, alpha: float = 0.0,
           direction: torch.Tensor | None = None, scales: torch.Tensor | None = None, top: int = -1,
           batch: int = 20) -> list[list[int]]:
    """Greedy replies (token ids, cut at the first end token), patched as served when ``gains [R, N]`` is
    given: ``alpha * gains`` at every layer of every generated position and at the layers above ``top``
    (the last read layer) of the last prompt token (left-padded batches through ``generate``: the
    prefill's last column is every row's last prompt token; each decode step feeds one generated token)."""
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        ids, attn = left_padded(chunk, pad_id)
        width = ids.shape[1]
        g = None if gains is None else gains[i : i + batch]

        def delta(layer: int, h: torch.Tensor, g: torch.Tensor | None = g) -> torch.Tensor | None:
            if g is None:
                return None
            if h.shape[1] == 1:  # a decode step: one generated token per row
                return alpha * g[:, layer, None, None]
            if layer <= top:  # the prefill below the decision: untouched
                return None
            d = torch.zeros(h.shape[0], h.shape[1], 1)
            d[:, -1, 0] = alpha * g[:, layer]  # the last prompt token, above the read layers
            return d

        ctx = patched(model, direction, scales, delta) if gains is not None and direction is not None \
            and scales is not None else contextlib.nullcontext()
        with torch.inference_mode(), ctx:
            gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=pad_id, eos_token_id=list(eos_ids))
        for row in gen[:, width:].tolist():
            cut = next((k for k, t in enumerate(row) if t in eos_ids), len(row))
            out.append(row[:cut])
    return out


def rates(texts: Sequence[str]) -> tuple[float, float]:
    """(share judged a refusal, mean repeated-trigram share) of replies."""
    return (sum(is_refusal(t) for t in texts) / len(texts), sum(repetition(t) for t in texts) / len(texts))


def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counting half (the Mann-Whitney AUROC)."""
    diff = pos.double()[:, None] - neg.double()[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
