"""The fast path: ``kvq_kernels``' Triton decode attention over the cache's own buffers (zero-copy views).

Used for a single query token when the kernels' fixed layout (``kvq_kernels.reference``) represents the
layer's configuration exactly; ``KVQLayer.attend`` falls back to the blockwise PyTorch reference
(``attention.blockwise_attention``) otherwise. Exactly representable:

* kvquant: per-channel pre-RoPE keys, with or without KVQuant's sparse outliers (the stores' per-row
  ``SparseRows`` go to the kernel as they are), one codebook per layer (not ``head_codebooks``), per-head value
  ranges (not ``token_scales``), a RoPE without attention scaling (the kernels rotate with the model's own
  ``inv_freq``, passed to them);
* kivi: a group that is a power of two >= 16 (tokens per key group; value groups ``min(group, D)`` channels, as
  the method stores them); keys and values leave the residual window together, a group at a time, so their
  counts always agree.
* int, nf: every configuration (2/3/4-bit packed codes, int's 8-bit codes as bytes; one fp16 scale, and for int
  a zero, per token-head vector; nf's codebook from the method, ``NormalFloat.levels``); keys post-RoPE.

* cq: no sparse outliers, D, c and D / c powers of two with D / c >= 2 (``cq_decode.supported``); pre-RoPE
  keys rotated with the model's ``inv_freq`` (no attention scaling), post-RoPE keys as they are;
* pq: no sparse outliers, D, M and D / M powers of two, M >= 2 (``pq_decode.supported``); shared or per-head codebooks
  (``head_codebooks``); with ``rope_pairs`` the kernel's tables are built from the query in the packed keys'
  channel order (``PQCache.key_order``).

All need K and V buffers of equal capacity and strides (always so with ``max_tokens``), a power-of-two head_dim
(their tiles), no attention logit softcapping (Gemma 2; the kernels' softmax takes the plain scores) and, for keys
rotated inside the kernel (pre-RoPE kvquant / cq), a RoPE over every channel (not partial rotary) without attention
scaling; each layer's own ``inv_freq`` is passed (Gemma 3's sliding and full layers differ). Sliding-window layers
(``runtime.window``) are an fp16 ring attended by PyTorch. ``layer_refusal`` names what a layer lacks.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from .storage import Stream


def _same_layout(*tensors: Tensor) -> bool:
    """Contiguous ``(B, H, capacity, ...)`` buffers of one capacity (the kernels index them by ``capacity``)."""
    return all(t.is_contiguous() and t.shape[:3] == tensors[0].shape[:3] for t in tensors)


def _segments(ks: Stream, vs: Stream) -> dict | None:
    """The fp16 sink and residual buffers, when K and V agree on counts and layout."""
    if ks.packed.n != vs.packed.n or ks.residual.n != vs.residual.n or ks.sink.n != ks.sink_size:
        return None
    if not (_same_layout(ks.sink.buf, vs.sink.buf) and _same_layout(ks.residual.buf, vs.residual.buf)):
        return None
    return dict(sink_k=ks.sink.buf, sink_v=vs.sink.buf, res_k=ks.residual.buf, res_v=vs.residual.buf,
                n_packed=ks.packed.n, n_res=ks.residual.n)


def vq_refusal(layer) -> str | None:
    """Why the cq / pq kernels cannot hold ``layer``'s configuration (None: they can); from the method and the
    codebooks' shapes, before anything is stored."""
    m, ck = layer.method, layer.state16["key_codebook"]
    if getattr(m, "outliers", 0) > 0:
        return f"{m.name} with sparse per-token outliers (the kernel has no outlier pass)"
    if m.name == "pq":
        from kvq_kernels.pq_decode import supported

        msub = ck.shape[-3]
        d = msub * ck.shape[-1]
        if not supported(d, msub):
            return f"pq with head_dim {d} and {msub} subspaces (the kernel needs powers of two, M >= 2)"
        return layer_refusal(layer)
    from kvq_kernels.cq_decode import supported

    d = ck.shape[1] * ck.shape[3]
    if not supported(d, m.channels):
        return f"cq with head_dim {d} and {m.channels} channels (the kernel needs powers of two, D / c >= 2)"
    return layer_refusal(layer) or (rope_refusal(layer) if m.pre_rope else None)


def _vq_cache(layer, seg: dict):
    """``(CQCache / PQCache viewing layer's buffers (codebooks as stored), None)``, or ``(None, why not)``."""
    from kvq_kernels.vq_reference import CQCache, PQCache

    why = vq_refusal(layer)
    if why:
        return None, why
    m, kf, vf = layer.method, layer.keys_stream.packed.fields, layer.values_stream.packed.fields
    codes = dict(k_codes=kf["codes"].buf, v_codes=vf["codes"].buf, ck=layer.state16["key_codebook"],
                 cv=layer.state16["value_codebook"], bits=m.bits, **seg)
    if m.name == "pq":
        from ..methods.product import rope_pair_order

        d = codes["ck"].shape[-3] * codes["ck"].shape[-1]
        order = rope_pair_order(d, codes["ck"].device) if getattr(m, "rope_pairs", False) else None
        return PQCache(**codes, key_order=order), None
    if not m.pre_rope:
        return CQCache(**codes, pre_rope=False), None
    return CQCache(**codes, pre_rope=True, rope_theta=layer.rope_theta, inv_freq=layer.rope.inv_freq.float()), None


def rope_refusal(layer) -> str | None:
    """Why the kernels cannot rotate ``layer``'s pre-RoPE keys themselves (None: they can, with its ``inv_freq``)."""
    rope = layer.rope
    if rope is None or rope.attention_scaling != 1.0:
        return "a RoPE with attention scaling (the kernels rotate with inv_freq only)"
    d = getattr(layer.attn, "head_dim", None) or layer.keys_stream.packed.head_dim or 2 * rope.inv_freq.numel()
    if 2 * rope.inv_freq.numel() < d:
        return (f"partial rotary (RoPE on {2 * rope.inv_freq.numel()} of {d} channels; the kernels rotate every "
                "channel)")
    return None


def layer_refusal(layer) -> str | None:
    """What any kernel lacks for ``layer`` whatever its method: a sliding-window ring, logit softcapping, a head_dim
    that is not a power of two (None: nothing)."""
    if getattr(layer, "window", None) is not None:
        return (f"sliding-window layers (their last {layer.window:,} tokens in an fp16 ring, attended by the PyTorch "
                "reference)")
    if layer.softcap is not None:
        return f"attention logit softcapping ({layer.softcap:g}; the kernels' softmax takes the plain scores)"
    if not layer.kernel_layout:
        return "a head_dim that is not a power of two (the kernels' tiles need one; its codes are packed in groups)"
    return None


def _token_cache(layer, seg: dict):
    """``(TokenCache viewing layer's int / nf buffers, None)``, or ``(None, why not)``: codes ``(B, H, cap, nb)``,
    statistics ``(B, H, cap, 1)`` viewed as ``(B, H, cap)``."""
    from kvq_kernels.token_reference import TokenCache, check_token_bits

    m, kf, vf = layer.method, layer.keys_stream.packed.fields, layer.values_stream.packed.fields
    try:
        check_token_bits(layer.keys_stream.packed.head_dim, m.bits)
    except ValueError as exc:
        return None, f"{m.name}: {exc}"
    stats = ("scale", "zero") if m.name == "int" else ("scale",)
    if not _same_layout(kf["codes"].buf, vf["codes"].buf, *(f[n].buf for f in (kf, vf) for n in stats)):
        return None, "key and value buffers of different capacities"

    def stat(fields: dict, name: str) -> Tensor | None:
        return fields[name].buf.squeeze(-1) if name in stats else None  # (B, H, cap)

    levels = m.levels(kf["codes"].buf.device) if m.name == "nf" else None
    return TokenCache(k_packed=kf["codes"].buf, k_scale=stat(kf, "scale"), k_zero=stat(kf, "zero"),
                      v_packed=vf["codes"].buf, v_scale=stat(vf, "scale"), v_zero=stat(vf, "zero"), levels=levels,
                      bits=m.bits, **seg), None


def kvquant_refusal(layer) -> str | None:
    """Why the kvquant kernels cannot hold ``layer``'s configuration (None: they can)."""
    m = layer.method
    if not (m.per_channel and m.pre_rope) or layer.rope is None:
        return "kvquant with per-token or post-RoPE keys (the kernel takes per-channel pre-RoPE keys)"
    if any(layer.state16[name].dim() != 1 for name in ("key_codebook", "value_codebook")):
        return "kvquant with per-head codebooks (the kernels take one codebook per layer)"
    if m.stream_bits(False) != m.bits:
        return (f"kvquant with {m.bits}-bit keys and {m.stream_bits(False)}-bit values in one layer (the kernel path "
                "passes one width)")
    return layer_refusal(layer) or rope_refusal(layer)


def kernel_cache(layer):
    """A ``KVQuantCache`` / ``KIVICache`` / ``TokenCache`` / ``CQCache`` / ``PQCache`` viewing ``layer``'s buffers, or
    None where the layout cannot hold it (``reference_reason`` says why)."""
    return _kernel_cache(layer)[0]


def _kernel_cache(layer):
    """``(kernel cache, None)`` or ``(None, why the layout cannot hold the layer)``."""
    from kvq_kernels.reference import KIVICache, KVQuantCache

    why = layer_refusal(layer)
    if why:
        return None, why
    m, ks, vs = layer.method, layer.keys_stream, layer.values_stream
    if m.name not in ("kvquant", "kivi", "int", "nf", "cq", "pq"):
        return None, f"{m.name} (no Triton decode kernel for this method yet)"
    if ks.sink is None or "codes" not in ks.packed.fields or "codes" not in vs.packed.fields:
        return None, "nothing quantized yet (the whole context is in the fp16 sink / residual window)"
    seg = _segments(ks, vs)
    if seg is None:
        return None, "keys and values hold different counts or layouts (the sink is not full yet)"
    if m.name in ("cq", "pq"):
        if not _same_layout(ks.packed.fields["codes"].buf, vs.packed.fields["codes"].buf):
            return None, "key and value codes of different capacities"
        return _vq_cache(layer, seg)
    if m.name in ("int", "nf"):
        return _token_cache(layer, seg)
    kf, vf = ks.packed.fields, vs.packed.fields
    if not _same_layout(kf["codes"].buf, vf["codes"].buf, vf["scale"].buf, vf["zero"].buf):
        return None, "key and value buffers of different capacities"
    if m.name == "kvquant":
        why = kvquant_refusal(layer)
        if why:
            return None, why
        rope, state = layer.rope, layer.state()
        return KVQuantCache(
            k_packed=kf["codes"].buf, v_packed=vf["codes"].buf, v_min=vf["zero"].buf.squeeze(-1),
            v_scale=vf["scale"].buf.squeeze(-1), lo=state["key_lo"], hi=state["key_hi"], ck=state["key_codebook"],
            cv=state["value_codebook"],
            bits_k=m.bits, bits_v=m.bits, rope_theta=layer.rope_theta, inv_freq=rope.inv_freq.float(),
            k_sparse=ks.packed.outliers, v_sparse=vs.packed.outliers, **seg), None
    from kvq_kernels.reference import kivi_group_supported

    if not kivi_group_supported(m.group):
        return None, f"kivi with group {m.group} (the kernels take groups that are powers of two >= 16)"
    return KIVICache(k_packed=kf["codes"].buf, k_scale=kf["scale"].buf, k_zero=kf["zero"].buf,
                     v_packed=vf["codes"].buf, v_scale=vf["scale"].buf, v_zero=vf["zero"].buf, bits=m.bits,
                     group=m.group, **seg), None


def reference_reason(layer) -> str | None:
    """Why ``layer``'s decode goes (or would go) through the PyTorch reference path; None: the kernels serve it."""
    if getattr(layer, "window", None) is not None:
        return layer_refusal(layer)
    use = layer.use_kernel if layer.use_kernel is not None else kernels_available(
        getattr(layer, "device", None) or torch.device("cpu"), layer.method)
    if not use:
        return "Triton kernels off (--no-kernels, or no CUDA device: the kernels run on CUDA)"
    return _kernel_cache(layer)[1]


def kernels_available(device: torch.device, method=None) -> bool:
    """Triton importable and a CUDA device (every code width has passed the CUDA tests). The interpreter is
    for tests, which force ``use_kernel``; ``method`` is accepted for callers that name one."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def kernel_decode(layer, query: Tensor, scaling: float) -> Tensor | None:
    """Triton decode attention of ``query (B, Hq, 1, D)`` over ``layer``: ``(B, Hq, 1, D)`` in the query's dtype
    (the kernels accumulate in float32; no float32 round trip, which cost two launches per layer), or None."""
    cache = kernel_cache(layer)
    if cache is None:
        return None
    name = layer.method.name
    if name == "cq":
        from kvq_kernels.cq_decode import decode_attention_cq as fn
    elif name in ("int", "nf"):
        from kvq_kernels.decode_token import decode_attention_token as fn
    elif name == "pq":
        from kvq_kernels.pq_decode import decode_attention_pq as fn
    else:
        from kvq_kernels.decode_attention import decode_attention_kivi, decode_attention_kvquant

        fn = decode_attention_kvquant if name == "kvquant" else decode_attention_kivi
    q = query[:, :, 0].contiguous()  # (B, Hq, D)
    # Triton launches on the current device, and layers may sit on several GPUs (--device-map)
    extra = {"lens": layer.lens} if layer.captured else {}  # a graph step: counts on the device
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        return fn(q, cache, sm_scale=scaling, **extra)[:, :, None]  # (B, Hq, 1, D)
