"""Capture calibration statistics of every layer's keys and values, with their Fisher information.

One forward (and, when the method needs Fisher information, one backward) pass per calibration
sample. Hooks keep, per layer:

* a random subsample of token vectors of K and V ``(N, H, D)`` and their squared gradients (the
  Fisher information: squared gradient of the LM loss with respect to the pre-RoPE keys where the model computes
  them (``hf_attention.pre_rope_hooks``: after ``k_norm``, in whatever layout, or the key slice of a fused
  ``qkv_proj``), or the post-RoPE keys when the method quantizes keys after RoPE, and the values as attention
  reads them);
* exact per-channel key thresholds over *all* tokens: a streaming top-k of the largest and smallest
  values per channel, so the ``key_outlier_fraction / 2`` quantiles on each side are exact. ``capture_each`` keeps
  enough extremes for the largest of several fractions and reads every fraction's thresholds from them: one pass for
  configurations that differ only in their outlier fraction (``kvq calibrate --avg-bits --outliers auto``).

Only the subsample and the top-k trackers are held: never every layer's full activations. The first
``method.sink`` tokens of each sample are left out (the cache keeps them in full precision).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..hf_attention import attached, attention_layers, kvq_attention, pre_rope_hooks
from ..methods.base import KVMethod, LayerCalibration


@dataclass
class _LayerStats:
    keep: int  # k+1 extremes tracked per side
    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    key_fisher: list[Tensor] = field(default_factory=list)
    value_fisher: list[Tensor] = field(default_factory=list)
    top: Tensor | None = None  # (keep, H, D) largest key values seen
    bottom: Tensor | None = None  # (keep, H, D) smallest key values seen
    tokens: int = 0

    def track(self, k: Tensor) -> None:
        """Merge one sample's keys ``(H, T, D)`` into the per-channel extremes."""
        x = k.detach().float().transpose(0, 1)  # (T, H, D)
        top = x if self.top is None else torch.cat([self.top, x])
        bottom = x if self.bottom is None else torch.cat([self.bottom, x])
        n = min(self.keep, top.shape[0])
        self.top = top.topk(n, dim=0).values
        self.bottom = (-bottom).topk(n, dim=0).values.neg()
        self.tokens += x.shape[0]

    def results(self, fisher: bool, keeps: Sequence[int]) -> list[LayerCalibration]:
        """The layer's calibration for each count of extremes per side in ``keeps`` (each at most ``self.keep``):
        thresholds at the ``keep``-th largest and smallest key value per channel, the samples shared."""
        cat = lambda xs: torch.cat(xs) if xs else None  # noqa: E731
        base = LayerCalibration(
            keys=cat(self.keys),
            values=cat(self.values),
            key_fisher=cat(self.key_fisher) if fisher else None,
            value_fisher=cat(self.value_fisher) if fisher else None,
            tokens=self.tokens,
        )
        return [dataclasses.replace(base, key_lo=_at(self.bottom, k), key_hi=_at(self.top, k)) for k in keeps]


def _at(extremes: Tensor | None, keep: int) -> Tensor | None:
    """The ``keep``-th of the tracked extremes ``(n, H, D)`` (sorted, the most extreme first): ``(H, D)``."""
    return None if extremes is None else extremes[min(keep, extremes.shape[0]) - 1]


def capture(
    model: nn.Module,
    samples: Tensor,
    method: KVMethod,
    max_tokens: int = 16384,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[LayerCalibration]:
    """Calibration statistics per layer from ``samples`` ``(S, T)`` token ids (already on the model's device).

    ``max_tokens``: token vectors kept per layer for codebook fitting (spread evenly over samples).
    """
    return capture_each(model, samples, [method], max_tokens, seed, progress)[0]


def capture_each(
    model: nn.Module,
    samples: Tensor,
    methods: Sequence[KVMethod],
    max_tokens: int = 16384,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> list[list[LayerCalibration]]:
    """``capture`` for configurations that differ only in their outlier fraction, in one pass: each one's
    calibrations, in order, exactly as ``capture`` gives them. They share the subsampled ``(N, H, D)`` keys, values
    and Fisher information (the same tensors); each has its own exact thresholds ``key_lo``/``key_hi`` ``(H, D)``."""
    method = methods[0]
    if any(_without_outliers(m) != _without_outliers(method) for m in methods):
        raise ValueError("capture_each: the configurations differ in more than their outlier fraction")
    layers = attention_layers(model)
    n_samples, seqlen = samples.shape
    sink = min(method.sink, seqlen - 1)
    usable = seqlen - sink
    total = n_samples * usable
    keeps = [math.ceil(m.key_outlier_fraction / 2 * total) + 1 for m in methods]
    stats = [_LayerStats(max(keeps)) for _ in layers]
    per_sample = min(usable, math.ceil(max_tokens / n_samples))
    fisher = method.needs_fisher
    gen = torch.Generator().manual_seed(seed)
    pick: dict[str, Tensor] = {}

    def record(store: list[Tensor], grads: list[Tensor], out: Tensor, heads: Callable[[Tensor], Tensor]) -> None:
        """Keep the picked tokens of ``heads(out)`` ``(1, H, T, D)`` and, on backward, their squared gradients.

        ``out`` is the tensor the model goes on computing with (its gradient hook fires); ``heads`` views it
        (or its gradient) per head.
        """
        idx = pick["idx"].to(out.device)
        store.append(heads(out.detach())[0, :, idx].transpose(0, 1).float())  # (n, H, D)
        if fisher and out.requires_grad:
            out.register_hook(lambda g: grads.append(heads(g.detach())[0, :, idx].transpose(0, 1).float().square()))

    def on_keys(st: _LayerStats, out: Tensor, heads: Callable[[Tensor], Tensor]) -> None:
        st.track(heads(out.detach())[0, :, sink:])
        record(st.keys, st.key_fisher, out, heads)

    handles = []
    if method.keys_pre_rope:  # keys where the model computes them, whatever its projection / norm / transpose order
        for attn, st in zip(layers, stats, strict=True):
            handles += pre_rope_hooks(attn, lambda out, heads, st=st: on_keys(st, out, heads))

    def seen(module, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """In the attention function: values ``(B, H, T, D)`` as attention reads them, and post-RoPE keys."""
        same = lambda t: t  # noqa: E731
        record(module._kvq_stats.values, module._kvq_stats.value_fisher, value, same)
        if not method.keys_pre_rope:
            on_keys(module._kvq_stats, key, same)
        return key, value

    embed = model.get_input_embeddings()
    if fisher:  # gradients flow to activations only, never accumulate in weights
        handles.append(embed.register_forward_hook(lambda m, i, out: out.requires_grad_()))
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with (
            kvq_attention(model),
            attached(layers, "_kvq_stats", stats),
            attached(layers, "_kvq_transform", [seen] * len(layers)),
        ):
            for ids in samples:
                pick["idx"] = sink + torch.randperm(usable, generator=gen)[:per_sample].sort().values
                with torch.set_grad_enabled(fisher):
                    out = model(ids[None], labels=ids[None] if fisher else None, use_cache=False)
                    if fisher:
                        out.loss.backward()
                del out
                if progress:
                    progress(1)
    finally:
        for h in handles:
            h.remove()
        for p, r in zip(model.parameters(), requires, strict=True):
            p.requires_grad_(r)
    per_layer = [st.results(fisher, keeps) for st in stats]
    return [list(calibs) for calibs in zip(*per_layer, strict=True)]


def _without_outliers(method: KVMethod) -> KVMethod:
    """``method`` at outlier fraction 0 (what ``capture_each`` requires its configurations to share)."""
    return dataclasses.replace(method, outliers=0.0) if hasattr(method, "outliers") else method


def sample_windows(ids: Tensor, samples: int, seqlen: int, seed: int = 0) -> Tensor:
    """``samples`` random non-overlapping windows ``(S, seqlen)`` of the token ids (seeded)."""
    from ..errors import KvqError

    available = ids.numel() // seqlen
    if available < samples:
        raise KvqError(
            f"calibration text has {ids.numel()} tokens: too little for --samples {samples} x --seqlen {seqlen}"
            f" ({samples * seqlen} tokens needed)"
        )
    order = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:samples].sort().values
    return torch.stack([ids[i * seqlen : (i + 1) * seqlen] for i in order.tolist()])
