"""``KVQCache``: a transformers ``Cache`` whose layers keep keys and values bit-packed (see ``storage``).

Per layer: a key ``Stream`` and a value ``Stream`` (fp16 sink, packed history, fp16 residual window)
and the method's layer state (codebooks, thresholds) in fp16 when it is exactly representable there.
``update()`` quantizes and appends the new tokens and returns them unchanged; the bound attention
modules then attend over the packed cache (``attention.packed_attention``). Keys of pre-RoPE methods are
captured by forward hooks (``hf_attention.pre_rope_hooks``) and rotated at attention time at their own
position with the model's rotary embedding.

Usage: ``cache = kvq_cli.load_cache(artifact, model)``, then ``model.generate(ids, cache=cache)``
(``past_key_values=cache`` with transformers < 5.24; ``hf_attention.cache_kwargs`` picks the name).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import artifact as artifact_io
from ..errors import KvqError
from ..hf_attention import (
    ATTN_NAME,
    KVGeometry,
    _register,
    attention_layers,
    geometry_from_config,
    layer_device,
    layer_rope_key,
    passed_cache,
    pre_rope_hooks,
    text_config,
)
from ..methods.base import KVMethod, State
from .attention import DEFAULT_BLOCK, QUERY_TILE, Rope, block_bounds, blockwise_attention, packed_attention
from .decoded import MIRROR_BUDGET, DecodedMirror, mirror_tokens
from .fused import FusedAppend
from .graph_steps import GraphStepsCache, GraphStepsLayer
from .kernel_path import kernel_decode, kernels_available
from .prefill import chunked_prefill, flash_available, history_block
from .storage import Stream, check_packing
from .window import BoundLayer, WindowLayer

#: Methods whose encodings the runtime stores (per-token codes and statistics; KIVI's token groups).
SUPPORTED = ("fp16", "int", "nf", "kvquant", "kivi", "cq", "pq", "turbo")
#: Methods with vector-quantization codes (one code per channel group / subspace, stored as bit-stream rows).
VECTOR_CODES = ("cq", "pq")


def _fp16_state(state: State, device) -> State:
    """Layer state kept in fp16 where that is exact (codebooks, fp16-rounded thresholds), else float32."""
    out = {}
    for name, t in state.items():
        exact = torch.equal(t.float().half().float(), t.float())  # decided where the state is, then moved
        out[name] = (t.half() if exact else t.float()).to(device)
    return out


class KVQLayer(GraphStepsLayer, BoundLayer, CacheLayerMixin):
    """One attention layer's packed cache; ``update`` appends ``(B, H, T, D)`` keys and values."""

    is_compileable = False
    is_sliding = False
    is_croppable = False

    def __init__(self, method: KVMethod, state: State, index: int, batch: int, max_tokens: int | None,
                 rope: Rope | None, block: int, kernel_layout: bool = True):
        super().__init__()
        self.method, self.index, self.batch, self.max_tokens = method, index, batch, max_tokens
        #: head_dim a power of two, as the Triton layout needs (else the fused append is never used)
        self.kernel_layout = kernel_layout
        self.rope, self.state16 = rope, state
        self._state32: State | None = None
        self.step = method.group if method.name == "kivi" else 1
        self.block = max(self.step, block - block % self.step)  # packed-key groups never straddle blocks
        self.query_tile = QUERY_TILE  # queries attended at once (bounds the score tile of a long prefill)
        self.decode_block = self.block  # tokens dequantized at once for one decode query (set by load_cache)
        self.prefill_block = self.block  # history tokens per FlashAttention call of a prefill (set by load_cache)
        self.full_chunk = True  # a prefill chunk attends to itself in full precision (else as stored)
        #: FlashAttention prefill over dequantized history blocks: None = where available, True/False = force.
        self.prefill_fast: bool | None = None
        self.softcap: float | None = None  # the model's attention logit softcapping (Gemma 2)
        self.rope_theta = 10000.0  # the config's theta (the Triton path is given the model's own inv_freq)
        #: Triton decode and append: None = on CUDA where the layout is exact, True = wherever exact, False = never.
        self.use_kernel: bool | None = None
        self.attn: nn.Module | None = None
        self.pre_rope_key: Tensor | None = None  # set by the bound forward hook
        #: single-token decode attentions served by the Triton kernels / by the PyTorch reference path
        self.kernel_steps = self.reference_steps = 0
        #: the kind of CUDA-graph decode step under way ("plain", "flush", "append"; ``graph_steps``), None: eager.
        #: Its counts are in ``lens`` (``KVQCache.enter_graph_step``)
        self.captured: str | None = None
        self.lens: Tensor | None = None
        #: the CPU reference path's decoded float copy of the sink and packed history (``decoded``), None: off
        self.mirror: DecodedMirror | None = None
        self.reset()

    # ---- the transformers layer interface (the rest in ``window.BoundLayer``) --------------------------------
    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Quantize and append ``(B, H, T, D)`` keys (post-RoPE) and values; returns them unchanged."""
        self.check_update(key_states, value_states)
        if self.captured:  # a CUDA-graph step (``graph_steps``): static shapes, counts on the device
            return self.graph_update(key_states, value_states)
        keys = key_states
        if self.method.keys_pre_rope:
            if self.pre_rope_key is None:
                raise KvqError("pre-RoPE keys were not captured: bind the cache to this model")
            keys, self.pre_rope_key = self.pre_rope_key, None
        state = self.state()
        use = self.use_kernel if self.use_kernel is not None else kernels_available(key_states.device, self.method)
        fk, fv = self.fused if use else (None, None)
        ek = self.keys_stream.append(keys, state, self.method.encode_keys, fk)
        ev = self.values_stream.append(value_states, state, self.method.encode_values, fv)
        self.length += key_states.shape[2]
        self.pending = key_states.shape[2]
        if self.mirror is not None and not use:  # decode what was just packed (its cost counted here)
            self.mirror.extend(self, (ek, ev))
        return key_states, value_states

    def reset(self) -> None:
        m = self.method
        self.keys_stream = Stream(m, True, m.sink, m.residual, self.step, self.max_tokens)
        self.values_stream = Stream(m, False, m.sink, m.residual, self.step, self.max_tokens, stats_step=1)
        #: the Triton quantize-and-append of each stream, where it stores what the method's encode would
        self.fused = tuple(FusedAppend(m, key) if self.kernel_layout and FusedAppend.applies(m, key) else None
                           for key in (True, False))
        self.length = self.pending = 0
        self.is_initialized = False
        if self.mirror is not None:
            self.mirror = DecodedMirror(self.mirror.limit)

    # ---- kvq ------------------------------------------------------------------------------------
    def state(self) -> State:
        """The layer state in float32, made once (it never changes; decoding calls this every step)."""
        if self._state32 is None:
            self._state32 = {k: v.float() for k, v in self.state16.items()}
        return self._state32

    def read(self, a: int, b: int, state: State | None = None) -> tuple[Tensor, Tensor]:
        """Keys (post-RoPE) and values of positions ``[a, b)``: float32 ``(B, H, b - a, D)`` each; what the mirror
        holds as views of it (the same numbers, ``decode``d once), the rest through ``decode``."""
        mirror = self.mirror if self.use_kernel is not True else None
        if mirror is None:
            return self.decode(a, b, state)
        mirror.extend(self)
        m = mirror.n
        if b <= m:
            return mirror.read(a, b)
        if a >= m:
            return self.decode(a, b, state)
        (k0, v0), (k1, v1) = mirror.read(a, m), self.decode(m, b, state)
        return torch.cat([k0, k1], 2), torch.cat([v0, v1], 2)

    def decode(self, a: int, b: int, state: State | None = None) -> tuple[Tensor, Tensor]:
        """``read`` from the streams: dequantized (keys rotated) from what is stored."""
        state = self.state() if state is None else state
        k = self.keys_stream.read(a, b, state)
        if self.method.keys_pre_rope:
            k = self.rope.apply(k, torch.arange(a, b, device=k.device))
        return k, self.values_stream.read(a, b, state)

    def attend(self, query: Tensor, scaling: float, chunk: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Attention of ``query (B, Hq, Tq, D)`` (the newest ``Tq`` positions) over the cache: float32 (the
        Triton decode path: the query's dtype).

        ``chunk``: the newest ``Tq`` keys (post-RoPE) and values ``(B, Hkv, Tq, D)`` as the model computed
        them. A prefill chunk (``Tq > 1``) attends to them in full precision when ``full_chunk`` (the
        default), else to them as stored; a single decode token attends to everything as stored.
        One query token on CUDA: the Triton decode kernel where its layout is exact (``kernel_path``).
        A prefill chunk with fp16/bf16 queries on CUDA: FlashAttention over dequantized history blocks
        (``prefill.chunked_prefill``). Otherwise the blockwise PyTorch reference."""
        tq = query.shape[2]
        use = self.use_kernel if self.use_kernel is not None else kernels_available(query.device, self.method)
        if use and tq == 1:
            out = kernel_decode(self, query, scaling)
            if out is not None:
                self.kernel_steps += not self.captured  # graph replays are counted by ``graph_step_done``
                return out
            if self.captured:
                raise KvqError("a CUDA-graph decode step reached the reference path (a kvq bug: please report)")
        self.reference_steps += tq == 1
        state, outs = self.state(), []
        hist = self.length - tq  # positions before the chunk
        full = chunk is not None and tq > 1 and self.full_chunk

        def read(a: int, b: int) -> tuple[Tensor, Tensor]:
            if full and b > hist:  # the chunk itself, full precision (blocks never straddle ``hist``)
                return chunk[0][:, :, a - hist : b - hist].float(), chunk[1][:, :, a - hist : b - hist].float()
            return self.read(a, b, state)

        fast = self.prefill_fast if self.prefill_fast is not None else flash_available(query)
        if full and fast and self.softcap is None:
            bounds = block_bounds(hist, min(self.method.sink, hist), self.prefill_block)
            return chunked_prefill(query, read, bounds, chunk[0], chunk[1], scaling)
        block = self.block if tq > 1 else self.decode_block
        for s in range(0, tq, self.query_tile):  # query tiles: each reads only the keys it can see
            e = min(s + self.query_tile, tq)
            end = hist + e  # one past the tile's last query position
            if full:  # history blocks, then the chunk's own blocks
                bounds = block_bounds(hist, min(self.method.sink, hist), block)
                bounds += [(a, min(a + block, end)) for a in range(hist, end, block)]
            else:
                bounds = block_bounds(end, min(self.method.sink, end), block)
            outs.append(blockwise_attention(query[:, :, s:e], read, end, scaling, bounds,
                                            self.softcap))  # (B, Hq, e - s, D)
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)

    def nbytes(self, allocated: bool = False) -> int:
        state = sum(t.numel() * t.element_size() for t in self.state16.values())
        return self.keys_stream.nbytes(allocated) + self.values_stream.nbytes(allocated) + state


class KVQCache(GraphStepsCache, Cache):
    """A packed quantized KV cache for one model (one ``KVQLayer`` per attention layer)."""

    def __init__(self, layers: list[KVQLayer], method: KVMethod, kv_heads: int, head_dim: int):
        super().__init__(layers=layers)
        self.method, self.kv_heads, self.head_dim = method, kv_heads, head_dim
        self._handles: list = []
        self._model: nn.Module | None = None
        self._previous_attn: str | None = None
        self._lens: Tensor | None = None  # device counts of graph steps (``enter_graph_step``)

    def bind(self, model: nn.Module) -> KVQCache:
        """Route ``model``'s attention through this cache (and capture its pre-RoPE keys when needed)."""
        bound = getattr(model, "_kvq_bound_cache", None)
        if bound is not None:
            bound.unbind()
        attns = attention_layers(model)
        for attn, layer in zip(attns, self.layers, strict=True):
            attn._kvq_layer, attn._kvq_attention, layer.attn = layer, packed_attention, attn
            if self.method.keys_pre_rope and isinstance(layer, KVQLayer):
                def keep(out, heads, layer=layer):
                    layer.pre_rope_key = heads(out)  # (B, H, T, D)

                self._handles += pre_rope_hooks(attn, keep)
        self._handles.append(model.register_forward_pre_hook(self._check_inputs, with_kwargs=True))
        _register()
        self._previous_attn = model.config._attn_implementation
        model.set_attn_implementation(ATTN_NAME)
        self._model, model._kvq_bound_cache = model, self
        return self

    def _check_inputs(self, _model, args, kwargs) -> None:
        """Forward pre-hook: refuse padded batches (the registered attention gets no mask from transformers)."""
        if passed_cache(kwargs) is not self:  # under either name (``cache`` / ``past_key_values``)
            return
        mask = kwargs.get("attention_mask")
        if isinstance(mask, Tensor) and mask.dim() == 2 and not bool(mask.bool().all()):
            raise KvqError("the kvq cache runs plain causal attention only: padded batches (attention_mask with "
                           "padding) are not supported; generate each sequence on its own")

    def unbind(self) -> None:
        """Undo ``bind``: hooks removed, the model's previous attention implementation restored."""
        model, self._model = self._model, None
        for h in self._handles:
            h.remove()
        self._handles = []
        if model is None:
            return
        for attn in attention_layers(model):
            for name in ("_kvq_layer", "_kvq_attention"):
                if hasattr(attn, name):
                    delattr(attn, name)
        model.set_attn_implementation(self._previous_attn)
        model._kvq_bound_cache = None

    def nbytes(self, allocated: bool = False) -> int:
        """Bytes the cache holds: packed codes, fp16 scales/zeros, outliers (value + int16 position, plus one
        int32 count per group of tokens), fp16 sink and residual tokens and the per-layer state.
        ``allocated``: the buffers' capacity instead of their filled part."""
        return sum(layer.nbytes(allocated) for layer in self.layers)

    def mirror_nbytes(self) -> int:
        """Bytes of decoded float K/V the CPU reference path keeps beside the cache (``decoded``; not in ``nbytes``)."""
        return sum(layer.mirror.nbytes() for layer in self.layers if getattr(layer, "mirror", None) is not None)

    def decode_steps(self) -> dict:
        """Layer-steps of single-token decoding so far: ``{"kernel_steps", "reference_steps", "reference_reason"}``
        (the Triton kernels against the PyTorch reference; the reason names what the kernels cannot express,
        None when nothing went to the reference or the kernels were switched off)."""
        from .kernel_path import reference_reason

        ref = sum(layer.reference_steps for layer in self.layers)
        reasons = [r for layer in self.layers if layer.reference_steps for r in [reference_reason(layer)] if r]
        reason = "; ".join(dict.fromkeys(reasons)) or None
        return {"kernel_steps": sum(layer.kernel_steps for layer in self.layers), "reference_steps": ref,
                "reference_reason": reason}

    def capturable(self) -> bool:
        """``GraphStepsCache.capturable``, and every layer a packed ``KVQLayer`` with separate K/V projections (window
        layers and fused ``qkv_proj`` models decode eagerly)."""
        return all(isinstance(layer, KVQLayer) and hasattr(layer.attn, "k_proj") for layer in self.layers) and \
            super().capturable()

    def avg_bits(self) -> float:
        """``8 * nbytes()`` per cached K/V element (the quantity ``kvq_cli.accounting.avg_bits`` estimates)."""
        layer = self.layers[0]
        elements = len(self.layers) * 2 * layer.batch * self.kv_heads * self.head_dim * layer.length
        return 8 * self.nbytes() / elements if elements else math.nan


def _method_and_states(source, geom) -> tuple[KVMethod, list[State] | None]:
    if isinstance(source, KVMethod):
        return source, None
    if isinstance(source, tuple):  # (method, per-layer states), as the evaluation holds them
        return source[0], source[1] or None
    # a path: checked against the model's geometry from the header, before any tensor is read
    art = source if isinstance(source, artifact_io.Artifact) else artifact_io.load(Path(source), geom)
    art.check_model(geom)
    return art.method, art.states or None


def check_runtime(method: KVMethod, geom: KVGeometry) -> None:
    """``KvqError`` when the packed cache cannot hold ``method`` for a model of this geometry (decided before any
    weight is read)."""
    method.validate()
    if method.name not in SUPPORTED:
        raise KvqError(f"the runtime cache supports {', '.join(SUPPORTED)}, not {method.name}")
    if method.name in VECTOR_CODES:
        method.bits_per_token(geom.kv_heads, geom.head_dim)  # KvqError when c / M does not divide head_dim
        return
    method.bits_per_token(geom.kv_heads, geom.head_dim)  # KvqError for a head_dim the method refuses (turbo)
    layers = [method.for_layer(i) for i in range(geom.layers)]  # each layer's own widths (kvquant --avg-bits)
    for bits in sorted({m.stream_bits(s) for m in layers for s in (True, False)}):
        try:
            if bits <= 4:
                check_packing(geom.head_dim, bits)
        except ValueError as exc:
            raise KvqError(f"the packed cache cannot hold this model's keys: {exc}") from None


def load_cache(artifact_or_path, model: nn.Module, batch_size: int = 1, max_tokens: int | None = None,
               block: int = DEFAULT_BLOCK, full_chunk: bool = True, mirror_budget: int = MIRROR_BUDGET) -> KVQCache:
    """A packed cache for ``model`` from an artifact (path or ``Artifact``), a tuning-free ``KVMethod`` or a
    ``(method, states)`` pair, bound to the model: pass it as ``cache`` (``past_key_values`` before transformers
    5.24) to ``model(...)`` or ``model.generate(...)``. Refuses (``KvqError``) methods the runtime cannot store,
    padded batches (at the first forward) and head sizes the bit packing cannot hold.

    Sliding-window layers (``geometry.windows``) get a ``WindowLayer``: an fp16 ring of their last ``window`` tokens,
    not quantized; global layers the packed ``KVQLayer``. Pre-RoPE keys are rotated with each layer's own rotary
    frequencies (one per layer type where the model has several, e.g. Gemma 3), partial rotary included.

    ``max_tokens`` preallocates (and caps) every buffer; ``block``: tokens dequantized at once by attention.
    ``full_chunk``: a prefill chunk attends to its own keys and values in full precision (as generation does;
    False: as stored, i.e. exactly what simulated quantization computes). ``mirror_budget``: bytes of decoded
    float32 K/V that layers on the CPU keep to skip re-dequantizing their history every step (``decoded``; 0: none).
    """
    geom = geometry_from_config(model.config)
    method, states = _method_and_states(artifact_or_path, geom)
    check_runtime(method, geom)
    if method.needs_calibration and states is None:
        raise KvqError(f"method {method.name} needs calibration: pass its artifact from `kvq calibrate`")
    cfg = text_config(model.config)
    if batch_size < 1 or (max_tokens is not None and max_tokens < 1):
        raise KvqError("batch_size and max_tokens must be >= 1")
    attns = attention_layers(model)
    states = states if states is not None else [{} for _ in attns]
    if len(states) != len(attns):
        raise KvqError(f"the artifact has {len(states)} layer states for {len(attns)} layers")
    windows = geom.windows or (None,) * len(attns)
    types = [layer_rope_key(cfg, i) for i in range(len(attns))]
    ropes = Rope.layers(model, types) if method.keys_pre_rope else [None] * len(attns)
    pow2 = geom.head_dim & (geom.head_dim - 1) == 0
    softcap = getattr(cfg, "attn_logit_softcapping", None)
    step = method.group if method.name == "kivi" else 1
    decode_block = history_block(batch_size, geom.kv_heads, geom.head_dim, step, quarter=True)
    prefill_block = history_block(batch_size, geom.q_heads, geom.head_dim, step)
    layers: list = []
    for i, (s, attn) in enumerate(zip(states, attns, strict=True)):
        if windows[i] is not None:
            layer = WindowLayer(i, batch_size, windows[i], max_tokens)
        else:  # its state (and, as its tokens arrive, its packed cache) on the layer's device (--device-map)
            layer = KVQLayer(method.for_layer(i), _fp16_state(s, layer_device(attn)), i, batch_size, max_tokens,
                             ropes[i], block, kernel_layout=pow2)
            theta = geom.rope_theta
            layer.rope_theta = theta.get(types[i], next(iter(theta.values()))) if isinstance(theta, dict) else theta
            layer.decode_block, layer.prefill_block = max(layer.block, decode_block), prefill_block
        layer.softcap, layer.full_chunk = softcap, full_chunk
        layers.append(layer)
    cpu = [la for la, attn in zip(layers, attns, strict=True) if isinstance(la, KVQLayer)
           and torch.device(layer_device(attn)).type == "cpu"]
    tokens = mirror_tokens(mirror_budget, len(cpu), batch_size, geom.kv_heads, geom.head_dim)
    for layer in cpu if tokens > 0 else []:
        layer.mirror = DecodedMirror(tokens, max_tokens)
    return KVQCache(layers, method, geom.kv_heads, geom.head_dim).bind(model)
