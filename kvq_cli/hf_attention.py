"""Everything kvq touches inside a transformers model lives here (one module, public interfaces only).

* ``attention_layers(model)``: the attention modules, found by their public attributes (``layer_idx``,
  ``k_proj``, ``v_proj``), for any Llama-like architecture (Llama, Mistral, Qwen2, ...).
* ``kv_geometry(model)``: layers, KV heads, head_dim, query heads, RoPE parameters.
* A registered attention function (``AttentionInterface``) that lets kvq see post-RoPE keys and
  values of each layer, and forward hooks on the key projection that see pre-RoPE keys.
* ``cache_kwargs(model, cache)`` / ``passed_cache(kwargs)``: the cache argument under the name the installed
  transformers takes (``cache`` from 5.24, ``past_key_values`` before; the old name is deprecated there).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import KvqError

ATTN_NAME = "kvq"
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


@dataclass(frozen=True)
class KVGeometry:
    """Shapes of a model's KV cache."""

    layers: int
    kv_heads: int
    head_dim: int
    q_heads: int
    rope_theta: float
    max_positions: int | None
    architecture: str


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def geometry_from_config(config) -> KVGeometry:
    """KV geometry from a config alone (no weights)."""
    cfg = text_config(config)
    heads = cfg.num_attention_heads
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise KvqError(f"the model's config: num_attention_heads must be a positive integer, not {heads!r}")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    rope = getattr(cfg, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = theta or getattr(cfg, "rope_theta", None) or 10000.0
    arch = (getattr(cfg, "architectures", None) or [cfg.model_type])[0]
    positions = getattr(cfg, "max_position_embeddings", None)
    check_geometry(cfg.num_hidden_layers, kv_heads, head_dim, heads, theta, positions, where="the model's config")
    return KVGeometry(cfg.num_hidden_layers, kv_heads, head_dim, heads, float(theta), positions, arch)


#: Largest sizes a configuration may claim (beyond any released model, small enough to allocate per layer).
GEOMETRY_LIMITS = {"layers": 4096, "kv_heads": 4096, "head_dim": 8192, "q_heads": 4096}


def check_geometry(layers, kv_heads, head_dim, q_heads, rope_theta, max_positions=None, where="config") -> None:
    """``KvqError`` unless every size is an integer in ``1..GEOMETRY_LIMITS``, the query heads a multiple of the KV
    heads, ``rope_theta`` a positive finite number and ``max_positions`` None or a positive integer."""
    sizes = {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "q_heads": q_heads}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= GEOMETRY_LIMITS[name]:
            raise KvqError(f"{where}: {name} must be an integer in 1..{GEOMETRY_LIMITS[name]}, not {value!r}")
    if q_heads % kv_heads:
        raise KvqError(f"{where}: {q_heads} query heads are not a multiple of {kv_heads} KV heads")
    if isinstance(rope_theta, bool) or not isinstance(rope_theta, int | float) or not 0 < rope_theta < float("inf"):
        raise KvqError(f"{where}: rope_theta must be a positive number, not {rope_theta!r}")
    if max_positions is not None and (isinstance(max_positions, bool) or not isinstance(max_positions, int)
                                      or max_positions < 1):
        raise KvqError(f"{where}: max_position_embeddings must be a positive integer, not {max_positions!r}")


def attention_layers(model: nn.Module) -> list[nn.Module]:
    """Attention modules ordered by ``layer_idx``; refuses architectures without separate K/V projections."""
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "v_proj") and hasattr(m, "k_proj")]
    if not layers:
        raise KvqError(f"{type(model).__name__}: no attention layers with k_proj/v_proj found; kvq does not support it")
    return sorted(layers, key=lambda m: m.layer_idx)


def pre_rope_module(attn: nn.Module) -> nn.Module:
    """The last module whose output is the pre-RoPE key (``k_norm`` where the model has one)."""
    return getattr(attn, "k_norm", None) or attn.k_proj


def split_heads(out: Tensor, head_dim: int) -> Tensor:
    """``(B, T, H*D)`` or ``(B, T, H, D)`` projection output -> ``(B, H, T, D)`` view."""
    b, t = out.shape[:2]
    return out.reshape(b, t, -1, head_dim).transpose(1, 2)


def merge_heads(x: Tensor, like: Tensor) -> Tensor:
    """Inverse of ``split_heads``: ``(B, H, T, D)`` -> the projection output's shape."""
    return x.transpose(1, 2).reshape(like.shape)


# ---- the registered attention function ----------------------------------------------------------
#: Per attention module, a callable ``(module, key, value) -> (key, value)`` applied before attention.
KVTransform = Callable[[nn.Module, Tensor, Tensor], tuple[Tensor, Tensor]]


def _kvq_attention(module, query, key, value, attention_mask, **kwargs):
    """Attention function registered as ``"kvq"``: applies the module's KV transform, then SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    transform = getattr(module, "_kvq_transform", None)
    if transform is not None:
        key, value = transform(module, key, value)
    inner = getattr(module, "_kvq_attention", None)
    if inner is not None:  # a packed-cache attention supplied by the runtime
        return inner(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_NAME, _kvq_attention)


@contextlib.contextmanager
def kvq_attention(model: nn.Module) -> Iterator[None]:
    """Route the model's attention through kvq's function for the duration of the block."""
    _register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
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
