"""Perplexity, KL divergence and top-1 agreement over non-overlapping windows, baseline and quantized side by side.

For each batch of windows the unquantized model runs once; every configuration then runs on the same
windows and is compared token by token with that baseline (KL(p_fp || p_quant), argmax agreement).
Perplexity is exp of the mean next-token NLL over every predicted token (equal to the mean of
``model(ids, labels=ids).loss`` over windows, since all windows have the same length).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .methods.base import KVMethod, State
from .simulate import simulated


@dataclass
class Configuration:
    """One row of the table: a method with its per-layer states (None for the unquantized baseline)."""

    name: str
    method: KVMethod | None = None
    states: list[State] | None = None
    avg_bits: float = 16.0
    source: str = ""  # artifact path or "--method"


@dataclass
class _Totals:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0


def _context(model: nn.Module, config: Configuration):
    if config.method is None:
        return contextlib.nullcontext()
    return simulated(model, config.method, config.states)


# ---- forward by mode (``api.MODES``): simulated = one pass; streaming = chunks through the packed cache ----
def _logits(model: nn.Module, ids: Tensor, config: Configuration, mode: str, chunk: int,
            full_chunk: bool = True) -> Tensor:
    """Logits ``(b, T, V)`` of one configuration on ``ids (b, T)`` in ``mode`` (the baseline: one plain pass)."""
    if config.method is not None and mode == "streaming":
        from .runtime.stream import streaming_logits

        return streaming_logits(model, ids, config.method, config.states, chunk, full_chunk)
    with _context(model, config):
        return model(ids, use_cache=False).logits


@torch.inference_mode()
def evaluate(model: nn.Module, windows: Tensor, configs: list[Configuration], batch_size: int = 1,
             device: str | torch.device = "cpu", progress: Callable[[int], None] | None = None,
             mode: str = "simulated", chunk: int = 128, full_chunk: bool = True) -> list[dict]:
    """Evaluate the baseline and each configuration on ``windows`` ``(W, T)``.

    Returns one dict per configuration, baseline first: ``name``, ``perplexity``, ``avg_bits``,
    ``kl_divergence`` (nats per token, baseline 0), ``top1_agreement`` (fraction, baseline 1).
    ``progress(n)`` is called after each forward pass with the number of windows it covered.
    ``mode``: ``simulated`` (one pass, every K/V quantize-dequantized) or ``streaming`` (each window fed
    ``chunk`` tokens at a time through the packed ``KVQCache``, residual windows included; each chunk
    attends to itself in full precision, or as stored with ``full_chunk=False``).
    """
    everything = [Configuration("baseline")] + list(configs)
    totals = [_Totals() for _ in everything]
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size].to(device)  # (b, T)
        targets = ids[:, 1:]
        base_logp = None
        for config, tot in zip(everything, totals, strict=True):
            logits = _logits(model, ids, config, mode, chunk, full_chunk)[:, :-1].float()  # (b, T-1, V)
            logp = torch.log_softmax(logits, dim=-1)
            del logits
            tot.nll += -logp.gather(-1, targets.unsqueeze(-1)).double().sum().item()
            tot.tokens += targets.numel()
            if base_logp is None:
                base_logp = logp
                tot.agree += targets.numel()
            else:
                tot.kl += (base_logp.exp() * (base_logp - logp)).sum(-1).double().sum().item()
                tot.agree += (base_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            if progress:
                progress(ids.shape[0])
    return [
        {
            "name": c.name,
            "perplexity": math.exp(t.nll / t.tokens),
            "avg_bits": c.avg_bits,
            "kl_divergence": t.kl / t.tokens,
            "top1_agreement": t.agree / t.tokens,
        }
        for c, t in zip(everything, totals, strict=True)
    ]
