"""Memory estimates: KV cache, weights and a workspace allowance against a GPU budget (no weights read).

The KV arithmetic is the runtime's own (``kvq_cli.accounting.cache_bits``, residual window and sink in
16 bits, per-layer state once). The rest, stated so every number can be checked by hand:

* weights = parameter count (from the shapes) x bytes per parameter (bf16/fp16 2, int8 1, int4 0.5;
  nominal: no quantization scales);
* allowance = 1 GiB (CUDA context and allocator slack, which ``torch.cuda.max_memory_allocated`` does
  not see) + the activations of one prefill chunk of ``chunk = min(4096, context)`` tokens (logits only
  for the last token), all bf16:
    - hidden/MLP buffers: batch x chunk x (4 hidden + 2 intermediate) x 2 bytes;
    - fp16 (transformers' DynamicCache with SDPA): the chunk's causal mask over the context, batch x chunk
      x context x 2 bytes, and one layer's K/V repeated to the query heads plus the concatenation copy,
      batch x context x 2 (q_heads + kv_heads) x head_dim x 2 bytes;
    - the packed kvq cache (no mask: its attention is causal by construction), its GPU prefill
      (``runtime.prefill``, ``blocks``): one history block of L tokens (``history_block``: L x q_heads x head_dim
      <= 2^26) dequantized, 4 x batch x kv_heads x L x head_dim x 4 bytes (fp32 K and V and their
      temporaries), repeated to the query heads in bf16, 2 x batch x q_heads x L x head_dim x 2 bytes,
      and four fp32 partial outputs of the chunk, 4 x batch x q_heads x chunk x head_dim x 4 bytes;
      independent of the context.
  (Checked against measurements on an H100: ``docs/results/memory-check.md``, ``generate-long-context.md``.)
* KV: global layers hold every token as the method stores it; sliding-window layers (Gemma 2/3, Mistral with a
  window) their last ``window`` tokens in fp16, as the runtime's ring does (``runtime.window``); the 16-bit rows
  count them the same way (transformers' sliding-window cache layers also keep only the window).
* total = KV + weights + allowance; it fits when total <= budget. With ``gpus`` > 1 the layers are split
  over the GPUs (``kvq_cli.placement``: contiguous blocks, each layer's KV on its GPU, an allowance on
  every GPU) and it fits when every GPU does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .accounting import avg_bits, cache_bits
from .blocks import history_block
from .errors import KvqError
from .methods import KVMethod, parse_spec
from .methods.base import FP16_BITS
from .presets import GPU_PRESETS, MODEL_PRESETS, ModelShape, random_shape, shape_from_config

GiB = 1 << 30
PREFILL_CHUNK = 4096
#: CUDA context and allocator slack: counted in the total, invisible to torch.cuda.max_memory_allocated.
CONTEXT_OVERHEAD = GiB
WEIGHT_BYTES: dict[str, float] = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "int8": 1.0, "int4": 0.5}
DEFAULT_METHODS = ("fp16", "kivi2", "kivi4", "kvquant:bits=4,outliers=0.01", "kvquant:bits=3,outliers=0.01",
                   "kvquant:bits=2,outliers=0.01")
#: Largest context the solver looks at (2^40 tokens).
MAX_SEARCH = 1 << 40

_SIZE = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_CONTEXT_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_BYTE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
               "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def _parse(text: str, units: dict[str, int], what: str, examples: str) -> int:
    m = _SIZE.match(str(text))
    if not m or m.group(2).lower() not in units:
        raise KvqError(f"cannot read {what} {text!r}: write e.g. {examples}")
    number = float(m.group(1)) * units[m.group(2).lower()]
    if not 0 < number <= MAX_SEARCH * (1 << 20) or round(number) < 1:  # beyond any context or memory; never inf
        raise KvqError(f"{what} must be positive and at most {MAX_SEARCH * (1 << 20):.3g}, not {text[:40]!r}")
    return round(number)


#: Bounds of ``--batch`` and ``--gpus`` (beyond any machine; they keep the per-GPU plan small).
MAX_BATCH, MAX_GPUS = 1 << 20, 4096


def parse_context(text: str | int) -> int:
    """Tokens from ``131072``, ``128K``/``128k`` (x 1024), ``1M``/``1.5M`` (x 1024^2) or ``1G``."""
    tokens = _parse(str(text), _CONTEXT_UNITS, "context", "131072, 128K, 1M or 10M")
    if tokens > MAX_SEARCH:
        raise KvqError(f"context {text!r} is beyond {MAX_SEARCH:,} tokens")
    return tokens


def parse_budget(text: str | int) -> int:
    """Bytes from ``80GiB`` (2^30), ``80GB`` (1e9), ``512MiB``, ``1.5TB`` or a plain number of bytes."""
    return _parse(str(text), _BYTE_UNITS, "budget", "80GiB (x 2^30) or 80GB (x 10^9)")


def gpu_bytes(name: str) -> int:
    key = name.lower()
    if key not in GPU_PRESETS:
        raise KvqError(f"unknown GPU {name!r}; known: {', '.join(GPU_PRESETS)} (or give --budget, e.g. 80GiB)")
    return GPU_PRESETS[key]


def resolve_shape(spec: str, trust_remote_code: bool = False) -> ModelShape:
    """A preset's shapes, else the configuration of anything the model resolver takes (never weights; the model's
    own code runs only with ``trust_remote_code``). Presets, ``random:<preset>`` and a local folder whose config.json
    says all (``models.quick_config``) are read without transformers or torch."""
    from .models import load_config, quick_config, resolve_model

    if spec.lower() in MODEL_PRESETS:
        return MODEL_PRESETS[spec.lower()]
    try:
        source = resolve_model(spec, trust_remote_code)
    except KvqError as exc:
        raise KvqError(f"{exc}; presets for estimates: {', '.join(MODEL_PRESETS)}") from None
    if source.random:
        return random_shape(source.random, source.name)
    return shape_from_config(quick_config(source) or load_config(source), source.name)


def state_bits_estimate(method: KVMethod, kv_heads: int, head_dim: int) -> int:
    """One layer's state bits from the configuration: the method's own ``state_bits_estimate`` where it
    overrides the base (0), else for kvquant key_lo/key_hi (2 H D fp16, per-channel keys only) plus the
    K and V codebooks (2 x 2^bits fp16)."""
    if type(method).state_bits_estimate is not KVMethod.state_bits_estimate or method.name != "kvquant":
        return method.state_bits_estimate(kv_heads, head_dim)
    thresholds = 2 * kv_heads * head_dim if getattr(method, "per_channel", True) else 0
    return FP16_BITS * (thresholds + 2 * (1 << method.bits))


@dataclass
class Entry:
    """One configuration to estimate: a label, its method, and the bits of all layers' state."""

    name: str
    method: KVMethod
    state_bits: int

    @classmethod
    def from_method(cls, method: KVMethod, shape: ModelShape) -> Entry:
        """State estimated from the configuration (``state_bits_estimate``), for every layer."""
        return cls(method.label, method, shape.layers * state_bits_estimate(method, shape.kv_heads, shape.head_dim))


def kv_bytes(entry: Entry, shape: ModelShape, tokens: int, batch: int = 1) -> float:
    """Bytes of the KV cache at run time (residual window and sink in 16 bits), ``batch`` sequences."""
    return cache_bits(entry.method, shape.geometry(), tokens, entry.state_bits, with_residual=True, batch=batch) / 8


def layer_kv_bytes(entry: Entry, shape: ModelShape, tokens: int, batch: int = 1) -> list[float]:
    """``kv_bytes`` layer by layer: global layers as the method stores them, sliding-window layers their fp16 ring of
    ``window`` tokens; the state shared evenly."""
    from .accounting import layer_bits, window_layer_bits

    full = layer_bits(entry.method, shape.kv_heads, shape.head_dim, tokens, 0, True, batch)
    state = entry.state_bits / shape.layers
    return [(state + (full if w is None else window_layer_bits(w, shape.kv_heads, shape.head_dim, tokens, batch))) / 8
            for w in (shape.windows or (None,) * shape.layers)]


def weights_bytes(shape: ModelShape, dtype: str = "bf16") -> float:
    if dtype not in WEIGHT_BYTES:
        raise KvqError(f"--weights-dtype must be one of {', '.join(WEIGHT_BYTES)}, not {dtype!r}")
    return shape.params * WEIGHT_BYTES[dtype]


def activation_parts(shape: ModelShape, tokens: int, batch: int = 1, method: KVMethod | None = None,
                     chunk: int = PREFILL_CHUNK) -> dict[str, int]:
    """Allocator bytes beyond weights and KV at the peak of a chunked prefill (module docstring), by part."""
    chunk = min(chunk, tokens)
    parts = {"hidden and MLP buffers": batch * chunk * (4 * shape.hidden + 2 * shape.intermediate) * 2}
    if method is None or method.name == "fp16":  # SDPA gets a materialized causal mask and repeated K/V
        parts["causal mask (chunk x context)"] = batch * chunk * tokens * 2
        parts["one layer's K/V repeated to the query heads"] = (
            batch * tokens * 2 * (shape.heads + shape.kv_heads) * shape.head_dim * 2)
        return parts
    # the packed cache's prefill: one history block of L tokens dequantized (fp32 K and V with as many
    # temporaries), repeated to the query heads in bf16, and four fp32 chunk-sized partial outputs
    block = min(history_block(batch, shape.heads, shape.head_dim), tokens)
    parts["one dequantized history block"] = 4 * batch * shape.kv_heads * block * shape.head_dim * 4 + (
        2 * batch * shape.heads * block * shape.head_dim * 2)
    parts["partial outputs of the chunk"] = 4 * batch * shape.heads * chunk * shape.head_dim * 4
    return parts


def activation_bytes(shape: ModelShape, tokens: int, batch: int = 1, method: KVMethod | None = None,
                     chunk: int = PREFILL_CHUNK) -> int:
    """Allocator bytes beyond weights and KV at the peak of a chunked prefill (``activation_parts``, summed)."""
    return sum(activation_parts(shape, tokens, batch, method, chunk).values())


def allowance_bytes(shape: ModelShape, tokens: int, batch: int = 1, method: KVMethod | None = None,
                    chunk: int = PREFILL_CHUNK) -> int:
    """CUDA context (1 GiB) + ``activation_bytes``."""
    return CONTEXT_OVERHEAD + activation_bytes(shape, tokens, batch, method, chunk)


def total_bytes(entry: Entry, shape: ModelShape, tokens: int, batch: int, weights: float,
                chunk: int = PREFILL_CHUNK) -> float:
    return kv_bytes(entry, shape, tokens, batch) + weights + allowance_bytes(shape, tokens, batch, entry.method, chunk)


def largest_fitting(fits: Callable[[int], bool]) -> int:
    """Largest context in ``[1, MAX_SEARCH]`` for which ``fits`` holds (0: none); ``fits`` turns false once."""
    if not fits(1):
        return 0
    lo, hi = 1, MAX_SEARCH
    if fits(hi):
        return hi
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def max_context(entry: Entry, shape: ModelShape, batch: int, weights: float, budget: float,
                chunk: int = PREFILL_CHUNK) -> int:
    """Largest context whose total fits ``budget`` (0 when not even one token does); totals grow with context."""
    return largest_fitting(lambda t: total_bytes(entry, shape, t, batch, weights, chunk) <= budget)


def default_methods() -> list[KVMethod]:
    return [parse_spec(s) for s in DEFAULT_METHODS]


def with_fp16_first(entries: Sequence[Entry], shape: ModelShape) -> list[Entry]:
    """The fp16 reference first (added when missing), then the others in order."""
    rest = [e for e in entries if e.method.name != "fp16" or getattr(e.method, "pre_rope", False)]
    return [Entry.from_method(parse_spec("fp16"), shape), *rest]


def table_total(entry: Entry, shape: ModelShape, tokens: int, batch: int, weights_dtype: str, budget: float,
                gpus: int = 1, chunk: int = PREFILL_CHUNK) -> tuple[float, float]:
    """``(total bytes, the fullest GPU's bytes)``: what the estimate's table and plot show (one GPU: both the same;
    several: summed over ``placement.plan``, each GPU with its own allowance)."""
    if gpus == 1:
        total = total_bytes(entry, shape, tokens, batch, weights_bytes(shape, weights_dtype), chunk)
        return total, total
    from . import placement

    parts = [p["total_bytes"] for p in placement.plan(entry, shape, tokens, batch, weights_dtype, budget, gpus, chunk)]
    return sum(parts), max(parts)


def estimate(
    shape: ModelShape,
    entries: Sequence[Entry],
    context: int,
    batch: int = 1,
    weights_dtype: str = "bf16",
    budget: int | None = None,
    gpus: int = 1,
    gpu: str | None = None,
    chunk: int = PREFILL_CHUNK,
) -> dict[str, Any]:
    """The estimate as JSON-able data: one result per entry (fp16 first), against ``budget x gpus``; the
    allowance counts the activations of a prefill of ``chunk`` tokens."""
    if context < 1:
        raise KvqError(f"context must be positive, not {context}")
    if not 1 <= batch <= MAX_BATCH:
        raise KvqError(f"--batch must be in 1..{MAX_BATCH}, not {batch}")
    if not 1 <= gpus <= MAX_GPUS:
        raise KvqError(f"--gpus must be in 1..{MAX_GPUS}, not {gpus}")
    if not 1 <= chunk <= MAX_SEARCH:
        raise KvqError(f"--chunk must be in 1..{MAX_SEARCH:,}, not {chunk}")
    if budget is None:
        gpu = gpu or "h100-80gb"
        budget = gpu_bytes(gpu)
    total_budget = budget * gpus
    weights = weights_bytes(shape, weights_dtype)
    geom = shape.geometry()
    notes = []
    if shape.max_positions and context > shape.max_positions:
        notes.append(f"context {context:,} is beyond {shape.name}'s {shape.max_positions:,} positions: "
                     "the numbers are memory arithmetic only")
    rings = sorted({w for w in shape.windows or () if w is not None})
    if rings:
        n = sum(w is not None for w in shape.windows)
        notes.append(f"{n} of {shape.layers} layers attend to a sliding window ({', '.join(f'{w:,}' for w in rings)} "
                     "tokens): each keeps only its window, in fp16 (not quantized); avg bits spread every layer's bits "
                     "over every token")
    results = []
    for e in with_fp16_first(entries, shape):
        kv = kv_bytes(e, shape, context, batch)
        total, fullest = table_total(e, shape, context, batch, weights_dtype, budget, gpus, chunk)
        row = {
            "name": e.name,
            "avg_bits": avg_bits(e.method, geom, context, e.state_bits, with_residual=True),
            "kv_bytes_per_token": kv / (batch * context),
            "kv_bytes": kv,
            "weights_bytes": weights,
            "total_bytes": total,
            "allowance_bytes": allowance_bytes(shape, context, batch, e.method, chunk),
            "fits": fullest <= budget,
            "max_context": max_context(e, shape, batch, weights, total_budget, chunk),
        }
        if gpus > 1:  # layers split over the GPUs, each layer's cache with its layer (``placement``)
            from . import placement

            row["placement"] = placement.plan(e, shape, context, batch, weights_dtype, budget, gpus, chunk)
            row["max_context"] = placement.max_context(e, shape, batch, weights_dtype, budget, gpus, chunk)
        results.append(row)
    return {
        "model": shape.name,
        "context": context,
        "batch": batch,
        "budget_bytes": total_budget,
        "gpu": gpu,
        "gpus": gpus,
        "chunk": min(chunk, context),
        "weights_dtype": weights_dtype,
        "params": shape.params,
        "max_positions": shape.max_positions,
        "allowance_bytes": results[0]["allowance_bytes"],  # fp16's; each result has its own
        "allowance_parts": {"CUDA context and allocator slack": CONTEXT_OVERHEAD,
                            **activation_parts(shape, context, batch, None, chunk)},  # fp16's
        "notes": notes,
        "results": results,
    }


def curves(shape: ModelShape, entries: Sequence[Entry], batch: int, weights_dtype: str, budget: float, gpus: int,
           up_to: int, chunk: int = PREFILL_CHUNK, points: int = 120) -> dict[str, tuple[list[int], list[float]]]:
    """The table's bytes against context (log-spaced from 1K to ``up_to``) per entry, fp16 first: the total on one
    GPU, the fullest GPU's bytes on several (``table_total``), to compare with the per-GPU ``budget``."""
    lo = 1024
    hi = max(up_to, 2 * lo)
    xs = sorted({round(lo * (hi / lo) ** (i / (points - 1))) for i in range(points)})
    return {e.name: (xs, [table_total(e, shape, x, batch, weights_dtype, budget, gpus, chunk)[1] for x in xs])
            for e in with_fp16_first(entries, shape)}


def check_plot_path(path: str) -> Path:
    out = Path(path).expanduser()
    if not out.parent.is_dir():
        raise KvqError(f"--plot {path}: folder {out.parent} does not exist")
    return out
