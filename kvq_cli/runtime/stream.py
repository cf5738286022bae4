"""Streaming evaluation: a window fed through a fresh packed cache in chunks, as generation would."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import KvqError
from ..hf_attention import cache_kwargs
from ..methods.base import KVMethod, State
from .cache import load_cache


@torch.inference_mode()
def streaming_logits(model: nn.Module, ids: Tensor, method: KVMethod, states: list[State] | None,
                     chunk: int = 128, full_chunk: bool = True) -> Tensor:
    """Logits ``(B, T, V)`` of ``ids (B, T)`` fed ``chunk`` tokens at a time through a ``KVQCache``.

    Residual windows, sinks and online outliers behave exactly as in generation (each chunk attends to
    itself in full precision; ``full_chunk=False``: as stored, as simulated quantization does).
    """
    if chunk < 1:
        raise KvqError("--chunk must be at least 1")
    b, t = ids.shape
    cache = load_cache((method, states), model, batch_size=b, max_tokens=t, full_chunk=full_chunk)
    try:
        logits = [model(ids[:, s : s + chunk], **cache_kwargs(model, cache), use_cache=True).logits
                  for s in range(0, t, chunk)]  # each (B, chunk, V)
    finally:
        cache.unbind()
    return torch.cat(logits, 1)  # (B, T, V)
