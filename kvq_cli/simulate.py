"""Simulated quantization: one forward pass in which every K/V that attention reads is quantized.

Keys are quantized before RoPE (a forward hook on the key projection) when the method asks for it,
otherwise after RoPE (in kvq's registered attention function); values in the attention function.
The first ``method.sink`` tokens stay in full precision. Each layer runs ``method.for_layer(i)`` (its own bit widths
where the method has them). Residual windows need the runtime's
streaming mode and are not simulated here. Sliding-window layers stay in full precision, as the runtime keeps them
(``runtime.window``: an fp16 ring of their last ``window`` tokens).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from .hf_attention import attached, attention_layers, kvq_attention, layer_windows, pre_rope_hooks
from .methods.base import KVMethod, State


def _quantize_tail(x: Tensor, sink: int, fn) -> Tensor:
    """Apply ``fn`` to tokens ``sink:`` of ``x`` ``(B, H, T, D)``; the first ``sink`` tokens are kept."""
    if sink <= 0:
        return fn(x)
    if x.shape[2] <= sink:
        return x
    tail = torch.arange(sink, x.shape[2], device=x.device)
    return x.clone().index_copy_(2, tail, fn(x[:, :, sink:]))


@contextlib.contextmanager
def simulated(model: nn.Module, method: KVMethod, states: list[State] | None) -> Iterator[None]:
    """Within the block, ``model`` runs with K/V quantize-dequantized by ``method`` (per-layer ``states``)."""
    layers = attention_layers(model)
    states = states if states is not None else [{} for _ in layers]
    if len(states) != len(layers):
        raise ValueError(f"{len(states)} layer states for {len(layers)} layers")
    windows = layer_windows(model.config)
    handles = []
    sink = method.sink
    methods = [method.for_layer(i) for i in range(len(layers))]

    if method.keys_pre_rope:
        for attn, state, window, m in zip(layers, states, windows, methods, strict=True):
            if window is not None:
                continue

            def pre_hook(out, heads, state=state, m=m):
                return _quantize_tail(heads(out), sink, lambda t: m.fake_quant_keys(t, state))  # (B, H, T, D)

            handles += pre_rope_hooks(attn, pre_hook)

    def transform_for(m: KVMethod):
        def transform(module, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
            state = module._kvq_state
            if state is None:  # a sliding-window layer: full precision
                return key, value
            if not m.keys_pre_rope:
                key = _quantize_tail(key, sink, lambda t: m.fake_quant_keys(t, state))
            value = _quantize_tail(value, sink, lambda t: m.fake_quant_values(t, state))
            return key, value

        return transform

    states = [None if w is not None else s for s, w in zip(states, windows, strict=True)]
    try:
        with kvq_attention(model), attached(layers, "_kvq_state", states), attached(
            layers, "_kvq_transform", [transform_for(m) for m in methods]
        ):
            yield
    finally:
        for h in handles:
            h.remove()
