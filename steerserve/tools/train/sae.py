"""Training a TopK SAE with EleutherAI's ``sparsify`` on cached activations, measuring it and labelling it.

``fit`` uses sparsify's ``SparseCoder`` (TopK encoder, unit-norm decoder, AuxK loss for dead latents) and its
default optimiser (sign-SGD under schedule-free averaging, learning rate ``5e-3 / sqrt(d_sae / 2**14)``), with
sparsify's own per-step bookkeeping (decoder renormalised, the gradient parallel to each decoder row
removed), over activations cached in memory for several epochs: on a CPU the model's forward pass costs many
times the SAE's step, so running the model once is what makes training affordable. sparsify is imported only
here (``steerserve train sae``); serving never needs it. Its Triton decoder is for GPUs: on a CPU its eager
``embedding_bag`` path is used.

``measure`` reads the dictionary as serving does (``store.sae.Sae``); ``labels`` names every live feature
from its top-activating tokens and their contexts, with a topic prefix (``LEXICON``) when most of them are
about one topic, e.g. ``"weather: rain, storms (context: forecast)"``.
"""

from __future__ import annotations

import functools
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from steerserve.evaluation.concepts import LEXICON
from steerserve.store.sae import Sae
from steerserve.tools.train.sae_data import Activations

_STOP_WORDS = ("the a an and or of to in on at for with by from is are was were be been it its this that these "
               "those as but not you your i we they he she his her their our my me them us will can would could "
               "should has have had do does did so if then than there here what which who when where how all any "
               "some more most very also just about into out up one two")
_STOP = frozenset(_STOP_WORDS.split())


def fit(x: torch.Tensor, d_sae: int, k: int, epochs: int, batch: int, seed: int, lr: float | None = None,
        auxk_alpha: float = 1 / 32, dead_after: int = 100_000, log: Callable[[str], None] = print) -> Any:
    """A sparsify ``SparseCoder`` trained on the rows of ``x`` ([N, H]) for ``epochs`` shuffled passes."""
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # Triton's decoder is GPU-only; eager on the CPU
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SaeConfig, SparseCoder, sparse_coder
    from sparsify.sign_sgd import SignSGD
    from sparsify.utils import eager_decode

    sparse_coder.decoder_impl = eager_decode  # even when sparsify was imported before the variable was set

    torch.manual_seed(seed)
    sae = SparseCoder(x.shape[1], SaeConfig(num_latents=d_sae, k=k), "cpu", dtype=torch.float32)
    sae.b_dec.data = x.mean(0)  # as sparsify's trainer does on its first step: centred pre-activations
    rate = lr or 5e-3 / (d_sae / 2**14) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": rate}]), momentum=0.95)
    opt.train()
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    steps, started = 0, time.monotonic()
    for epoch in range(epochs):
        order, fvu_sum, n = torch.randperm(len(x), generator=gen), 0.0, 0
        for i in range(0, len(x) - batch + 1, batch):
            xb = x[order[i : i + batch]]
            sae.set_decoder_norm_to_unit_norm()
            dead = since_fired > dead_after
            out = sae(xb, dead_mask=dead if auxk_alpha > 0 else None)
            (out.fvu + auxk_alpha * out.auxk_loss).backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
            since_fired += len(xb)
            since_fired[out.latent_indices.flatten()] = 0
            fvu_sum, n, steps = fvu_sum + float(out.fvu), n + 1, steps + 1
        log(f"  epoch {epoch + 1}/{epochs}: train FVU {fvu_sum / max(n, 1):.4f}, "
            f"{int((since_fired > dead_after).sum())} latents dead for {dead_after} tokens, "
            f"{time.monotonic() - started:.0f} s")
    opt.eval()  # schedule-free: the averaged weights are the ones to keep
    sae.set_decoder_norm_to_unit_norm()
    return sae


@dataclass(frozen=True)
class Figures:
    fve: float  # 1 - sum |x - x_hat|^2 / sum |x - mean|^2 over the held-out tokens
    l0: float  # mean features active per token
    dead: int  # features that never fire on a held-out token
    tokens: int


@torch.no_grad()
def measure(sae: Sae, x: torch.Tensor, chunk: int = 4096) -> Figures:
    """FVE, mean L0 and dead features of ``sae`` on ``x``, encoded as serving reads the file."""
    err, fired, l0 = 0.0, torch.zeros(sae.d_sae, dtype=torch.bool), 0
    for i in range(0, len(x), chunk):
        xb = x[i : i + chunk]
        f = sae.encode(xb)
        active = f > 0
        fired |= active.any(0)
        l0 += int(active.sum())
        err += float(((f @ sae.w_dec + sae.b_dec - xb) ** 2).sum())
    var = float(((x - x.mean(0)) ** 2).sum())
    return Figures(round(1 - err / var, 4), round(l0 / len(x), 2), int((~fired).sum()), len(x))


@torch.no_grad()
def top_examples(sae: Sae, x: torch.Tensor, per_feature: int, chunk: int = 4096) -> dict[int, list[int]]:
    """Feature -> the token indices (rows of ``x``) where it is most active, highest first; live features only."""
    feats, rows, vals = [], [], []
    for i in range(0, len(x), chunk):
        f = sae.encode(x[i : i + chunk])
        t, j = f.nonzero(as_tuple=True)
        feats.append(j)
        rows.append(t + i)
        vals.append(f[t, j])
    feat, row, val = torch.cat(feats), torch.cat(rows), torch.cat(vals)
    order = val.argsort(descending=True, stable=True)
    order = order[feat[order].argsort(stable=True)]  # by feature, highest activation first within each
    feat, row = feat[order], row[order]
    ids, counts = feat.unique_consecutive(return_counts=True)
    out, start = {}, 0
    for f_, c in zip(ids.tolist(), counts.tolist(), strict=True):
        out[f_] = row[start : start + min(c, per_feature)].tolist()
        start += c
    return out


def labels(examples: dict[int, list[int]], acts: Activations, decode: Callable[[list[int]], str],
           window: int = 6) -> dict[int, str]:
    """A label per feature: its most frequent top-activating tokens, context words shared by its top
    examples, and a ``LEXICON`` topic when at least half of the examples touch that topic's words."""
    piece = functools.lru_cache(maxsize=None)(lambda t: decode([t]))
    tokens, seq = acts.tokens.tolist(), acts.seq.tolist()
    out: dict[int, str] = {}
    for feature, rows in examples.items():
        shown: dict[str, str] = {}
        tok_count: Counter[str] = Counter()
        ctx_count: Counter[str] = Counter()
        topic_hits: Counter[str] = Counter()
        for r in rows:
            raw = piece(tokens[r])
            word = raw.strip().lower() or repr(raw)
            shown.setdefault(word, raw.strip() or repr(raw))
            tok_count[word] += 1
            lo = r
            while lo > 0 and r - lo < window and seq[lo - 1] == seq[r]:
                lo -= 1
            hi = min(r + 2, len(tokens))
            while seq[hi - 1] != seq[r]:
                hi -= 1
            words = {w for w in "".join(piece(t) for t in tokens[lo:hi]).lower().replace("'", " ").split()
                     if w.isalpha() and w not in _STOP and len(w) > 2}
            ctx_count.update(words)
            topic_hits.update(t for t, lex in LEXICON.items() if words & lex or word in lex)
        top = [shown[w] for w, _ in tok_count.most_common(4)]
        ctx = [w for w, c in ctx_count.most_common(6) if c >= max(3, len(rows) // 8) and w not in tok_count][:3]
        label = ", ".join(top) + (f" (context: {', '.join(ctx)})" if ctx else "")
        topic, hits = topic_hits.most_common(1)[0] if topic_hits else ("", 0)
        out[feature] = f"{topic}: {label}" if hits >= 0.5 * len(rows) else label
    return out


def snippet(acts: Activations, row: int, decode: Callable[[list[int]], str], before: int = 10) -> str:
    """The text around token ``row`` (same sequence), the token itself in ``[[ ]]``."""
    tokens, seq = acts.tokens, acts.seq
    lo = row
    while lo > 0 and row - lo < before and int(seq[lo - 1]) == int(seq[row]):
        lo -= 1
    hi = row + 1
    while hi < len(tokens) and hi - row <= 3 and int(seq[hi]) == int(seq[row]):
        hi += 1
    return (decode(tokens[lo:row].tolist()) + "[[" + decode([int(tokens[row])]) + "]]"
            + decode(tokens[row + 1 : hi].tolist())).replace("\n", "\\n")
