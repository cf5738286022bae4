"""Everything kvq touches inside a transformers model lives here (one module, public interfaces only).

* ``attention_layers(model)``: the attention modules, found by their public attributes (``layer_idx``,
  ``k_proj``/``v_proj`` or a fused ``qkv_proj``), for Llama-like architectures (Llama, Mistral, Qwen2/3, Gemma 2/3,
  Phi-3).
* ``geometry_from_config`` (from ``kvq_cli.hf_config``, which reads configurations without torch): layers, KV heads,
  head_dim, query heads, RoPE thetas (one per layer type where the model has several), each layer's sliding window.
* A registered attention function (``AttentionInterface``) that lets kvq see post-RoPE keys and
  values of each layer (with the model's masks, sliding windows and logit softcapping), and forward hooks that
  see pre-RoPE keys whatever the projection / norm / transpose order (``pre_rope_hooks``).
* ``cache_kwargs(model, cache)`` / ``passed_cache(kwargs)``: the cache argument under the name the installed
  transformers takes (``cache`` from 5.24, ``past_key_values`` before; the old name is deprecated there).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from .errors import KvqError
from .hf_config import (  # noqa: F401 - the configuration's part (torch-free), named here too for the runtime
    KVGeometry,
    geometry_from_config,
    layer_rope_key,
    layer_windows,
    text_config,
)

#: The runtime's attention (no masks: the packed cache's attention is causal by construction, and windowed where the
#: layer is); ``MASKED_NAME``: simulation and calibration, with the masks transformers makes for SDPA.
ATTN_NAME = "kvq"
MASKED_NAME = "kvq_masked"
#: The cache argument's names in ``forward`` and ``generate``: the current one first.
CACHE_ARGUMENTS = ("cache", "past_key_values")


@functools.cache
def _cache_argument(forward_owner: type) -> str:
    params = inspect.signature(forward_owner.forward).parameters
    return next((name for name in CACHE_ARGUMENTS if name in params), CACHE_ARGUMENTS[-1])


def cache_argument(model: nn.Module) -> str:
    """The name under which ``model.forward`` takes its cache: ``cache`` (transformers >= 5.24) or
    ``past_key_values`` (earlier, where ``cache`` is unknown)."""
    return _cache_argument(type(model))


def cache_kwargs(model: nn.Module, cache) -> dict:
    """``{name: cache}`` with the name ``model`` prefers, for ``model(...)`` and ``model.generate(...)``."""
    return {cache_argument(model): cache}


def passed_cache(kwargs: dict):
    """The cache a caller passed to ``forward``/``generate`` under either name (None when absent)."""
    for name in CACHE_ARGUMENTS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """Attention modules ordered by ``layer_idx``; refuses architectures without K/V projections (separate
    ``k_proj``/``v_proj``, or a fused ``qkv_proj`` as Phi-3's)."""
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "head_dim") and (
        (hasattr(m, "v_proj") and hasattr(m, "k_proj")) or hasattr(m, "qkv_proj"))]
    if not layers:
        raise KvqError(f"{type(model).__name__}: no attention layers with k_proj/v_proj or qkv_proj found; kvq does "
                       "not support it")
    return sorted(layers, key=lambda m: m.layer_idx)


def layer_device(attn: nn.Module) -> torch.device:
    """The device of an attention layer's weights (where its cache lives)."""
    return (attn.k_proj if hasattr(attn, "k_proj") else attn.qkv_proj).weight.device


def _kv_heads(attn: nn.Module) -> int:
    proj = attn.k_proj if hasattr(attn, "k_proj") else None
    if proj is not None:
        return proj.out_features // attn.head_dim
    return text_config(attn.config).num_key_value_heads


def pre_rope_module(attn: nn.Module) -> nn.Module:
    """The last module whose output holds the pre-RoPE key (``k_norm`` where the model has one, ``qkv_proj`` where
    the projections are fused)."""
    return getattr(attn, "k_norm", None) or getattr(attn, "k_proj", None) or attn.qkv_proj


def split_heads(out: Tensor, head_dim: int) -> Tensor:
    """``(B, T, H*D)`` or ``(B, T, H, D)`` projection output -> ``(B, H, T, D)`` view."""
    b, t = out.shape[:2]
    return out.reshape(b, t, -1, head_dim).transpose(1, 2)


def merge_heads(x: Tensor, like: Tensor) -> Tensor:
    """Inverse of ``split_heads``: ``(B, H, T, D)`` -> the projection output's shape."""
    return x.transpose(1, 2).reshape(like.shape)


Heads = Callable[[Tensor], Tensor]
"""``heads(t)``: a tensor shaped as the hooked module's output (the output or its gradient) -> keys ``(B, H, T, D)``."""
KeyHook = Callable[[Tensor, Heads], "Tensor | None"]


def pre_rope_hooks(attn: nn.Module, fn: KeyHook) -> list:
    """Forward hooks that hand ``fn(out, heads)`` the module output holding ``attn``'s pre-RoPE keys (the tensor the
    model goes on computing with: gradient hooks on it fire) and ``heads``, its ``(B, H, T, D)`` view. When ``fn``
    returns keys ``(B, H, T, D)``, they replace the model's. Layouts:

    * ``k_proj`` ``(B, T, H*D)`` (Llama, Mistral, Qwen2, Gemma 2);
    * ``k_norm`` after ``k_proj``: ``(B, T, H, D)`` (Qwen3: the norm before the heads move ahead of the tokens) or
      ``(B, H, T, D)`` (Gemma 3: after). Told apart by which dimension has the layer's KV-head count, and where both
      have it by the norm's input strides (the projection's tokens are its outer dimension);
    * a fused ``qkv_proj`` ``(B, T, (Hq + 2 Hkv) D)`` (Phi-3): the key slice.

    Returns the handles (``.remove()`` each)."""
    d = attn.head_dim
    if not hasattr(attn, "k_proj"):  # fused q/k/v: keys are columns [Hq D, (Hq + Hkv) D)
        a = text_config(attn.config).num_attention_heads * d
        b = a + _kv_heads(attn) * d

        def fused(_mod, _inp, out):
            new = fn(out, lambda t: split_heads(t[..., a:b], d))
            if new is None:
                return None
            return torch.cat([out[..., :a], merge_heads(new.to(out.dtype), out[..., a:b]), out[..., b:]], -1)

        return [attn.qkv_proj.register_forward_hook(fused)]
    norm = getattr(attn, "k_norm", None)
    if norm is None:
        def proj(_mod, _inp, out):
            new = fn(out, lambda t: split_heads(t, d))
            return None if new is None else merge_heads(new.to(out.dtype), out)

        return [attn.k_proj.register_forward_hook(proj)]
    heads_n, seen = _kv_heads(attn), {}

    def before(_mod, args):
        x = args[0]
        seen["tokens_dim"] = _tokens_dim(x, heads_n) if x.dim() == 4 else None

    def after(_mod, _inp, out):
        dim = seen.pop("tokens_dim", None)
        if dim is None:  # (B, T, H*D): a norm over the whole projection
            new = fn(out, lambda t: split_heads(t, d))
            return None if new is None else merge_heads(new.to(out.dtype), out)
        if dim == 2:  # (B, H, T, D) already
            new = fn(out, lambda t: t)
            return None if new is None else new.to(out.dtype)
        new = fn(out, lambda t: t.transpose(1, 2))  # (B, T, H, D)
        return None if new is None else new.transpose(1, 2).to(out.dtype)

    return [norm.register_forward_pre_hook(before), norm.register_forward_hook(after)]


def _tokens_dim(x: Tensor, heads: int) -> int:
    """1 or 2: the dimension of a 4-D key tensor ``x`` that holds the tokens."""
    if x.shape[1] != x.shape[2]:
        return 2 if x.shape[1] == heads else 1
    return 1 if x.stride(1) >= x.stride(2) else 2  # tokens are the projection's outer dimension


# ---- the registered attention function ----------------------------------------------------------
#: Per attention module, a callable ``(module, key, value) -> (key, value)`` applied before attention.
KVTransform = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]


def _kvq_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention function registered as ``"kvq"``: applies the module's KV transform, then SDPA (``softcap_attention``
    where the model caps its attention logits, which SDPA cannot)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    transform = getattr(module, "_kvq_transform", None)
    if transform is not None:
        key, value = transform(module, key, value)
    inner = getattr(module, "_kvq_attention", None)
    if inner is not None:  # a packed-cache attention supplied by the runtime
        return inner(module, query, key, value, attention_mask, **kwargs)
    if kwargs.get("softcap") is not None:
        return softcap_attention(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def softcap_attention(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, scaling=None, softcap=None,
                      **kwargs) -> tuple[Tensor, None]:
    """Eager attention with logit softcapping (Gemma 2): ``s = cap tanh(q k / (sqrt(D) cap))``, then the mask
    (boolean: True attends; float: added; None: causal), softmax in float32. ``query (B, Hq, Tq, D)``, ``key``/``value``
    ``(B, Hkv, L, D)``; returns ``(B, Tq, Hq, D)`` as transformers' attention functions."""
    g = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(g, 1), value.repeat_interleave(g, 1)  # (B, Hq, L, D)
    scaling = scaling if scaling is not None else query.shape[-1] ** -0.5
    s = torch.matmul(query, k.transpose(2, 3)) * scaling  # (B, Hq, Tq, L)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    tq, length = s.shape[-2:]
    if attention_mask is None:
        causal = torch.arange(length, device=s.device)[None, :] > torch.arange(length - tq, length,
                                                                                device=s.device)[:, None]
        s = s.masked_fill(causal, -math.inf)
    elif attention_mask.dtype == torch.bool:
        s = s.masked_fill(~attention_mask[..., :length], -math.inf)
    else:
        s = s + attention_mask[..., :length]
    p = torch.softmax(s.float(), -1).to(query.dtype)
    return torch.matmul(p, v).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, _kvq_attention)
    AttentionInterface.register(MASKED_NAME, _kvq_attention)
    AttentionMaskInterface.register(MASKED_NAME, sdpa_mask)


@contextlib.contextmanager
def kvq_attention(model: nn.Module) -> Iterator[None]:
    """Route the model's attention through kvq's function for the duration of the block, with the masks SDPA
    would get (sliding windows; none where plain causal attention needs none)."""
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(MASKED_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@contextlib.contextmanager
def attached(layers: list[nn.Module], name: str, values: list) -> Iterator[None]:
    """Set ``module.<name>`` on each layer for the block, then remove it."""
    for m, v in zip(layers, values, strict=True):
        setattr(m, name, v)
    try:
        yield
    finally:
        for m in layers:
            if hasattr(m, name):
                delattr(m, name)


def rope_inv_freq(head_dim: int, theta: float, device=None) -> Tensor:
    """Default RoPE inverse frequencies ``(D/2,)``."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
