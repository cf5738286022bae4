"""Layers over several GPUs: contiguous blocks of decoder layers, each layer's packed cache on its layer's GPU.

The plan (``plan``) splits the ``L`` decoder layers into ``N`` contiguous blocks as even as possible (the
first ``L mod N`` GPUs take one more); the embeddings sit on the first GPU, the final norm and LM head on
the last (on the first when the embeddings are tied to the head). Per GPU:

    bytes = weights of its layers (+ embeddings / head) + KV of its layers + allowance,

where the KV of a layer is its share of ``memory.kv_bytes`` (``memory.layer_kv_bytes``: sliding-window layers hold
only their window) and the
allowance (``memory.allowance_bytes``: CUDA context and one prefill chunk's workspace) is charged on every
GPU, since every GPU runs attention. ``device_map`` turns a plan into an accelerate device map; the model is
then dispatched by accelerate and ``kvq_cli.load_cache`` keeps each layer's cache on its layer's device.
"""

from __future__ import annotations

from typing import Any

from . import memory
from .presets import ModelShape


def layer_blocks(layers: int, gpus: int) -> list[range]:
    """Contiguous blocks of layer indices, one per GPU, sizes differing by at most one (first ones larger)."""
    base, extra = divmod(layers, gpus)
    out, start = [], 0
    for g in range(gpus):
        n = base + (g < extra)
        out.append(range(start, start + n))
        start += n
    return out


def plan(entry: memory.Entry, shape: ModelShape, tokens: int, batch: int, weights_dtype: str, budget: float,
         gpus: int, chunk: int = memory.PREFILL_CHUNK) -> list[dict[str, Any]]:
    """Per GPU: its layers ``[first, last]``, weights, KV and total bytes, and whether they fit ``budget``."""
    per_param = memory.WEIGHT_BYTES[weights_dtype]
    layer_w = shape.layer_params * per_param
    embed = shape.vocab * shape.hidden * per_param
    tail = ((0 if shape.tied_embeddings else shape.vocab * shape.hidden) + shape.hidden) * per_param  # head, norm
    tail_gpu = 0 if shape.tied_embeddings else gpus - 1  # tied: with the embeddings (as ``device_map`` puts it)
    kv_layers = memory.layer_kv_bytes(entry, shape, tokens, batch)
    allowance = memory.allowance_bytes(shape, tokens, batch, entry.method, chunk)
    out = []
    for g, block in enumerate(layer_blocks(shape.layers, gpus)):
        weights = len(block) * layer_w + (embed if g == 0 else 0) + (tail if g == tail_gpu else 0)
        kv = sum(kv_layers[i] for i in block)
        total = weights + kv + allowance
        out.append({"gpu": g, "layers": [block.start, block.stop - 1] if len(block) else [], "weights_bytes": weights,
                    "kv_bytes": kv, "total_bytes": total, "fits": total <= budget})
    return out


def max_context(entry: memory.Entry, shape: ModelShape, batch: int, weights_dtype: str, budget: float, gpus: int,
                chunk: int = memory.PREFILL_CHUNK) -> int:
    """Largest context whose every GPU fits ``budget`` under ``plan`` (0 when none)."""
    return memory.largest_fitting(
        lambda t: all(p["fits"] for p in plan(entry, shape, t, batch, weights_dtype, budget, gpus, chunk)))


def device_map(layers: int, gpus: int, tied: bool, devices: list | None = None, prefix: str = "model") -> dict:
    """An accelerate device map for a Llama-like ``*ForCausalLM`` following ``layer_blocks``: module name ->
    device (``devices[g]``, default GPU index ``g``)."""
    devices = devices if devices is not None else list(range(gpus))
    blocks = layer_blocks(layers, gpus)
    out = {f"{prefix}.embed_tokens": devices[0], f"{prefix}.rotary_emb": devices[0]}
    for g, block in enumerate(blocks):
        out.update({f"{prefix}.layers.{i}": devices[g] for i in block})
    last = devices[0] if tied else devices[-1]
    out.update({f"{prefix}.norm": last, "lm_head": last})
    return out
