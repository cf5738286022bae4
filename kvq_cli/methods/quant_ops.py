"""Quantization building blocks shared by the methods (all arithmetic in float32).

Conventions of an encoding (``Encoded``):
    ``codes``           uint8, one code per element (unpacked), same shape as the input.
    ``scale``, ``zero`` float16, one per group (shape depends on the grouping).
    ``outlier_mask``    bool, input shape: entries kept exactly (sparse outliers), when there are any.
    ``outlier_values``  float16, input shape: the outliers' values (0 elsewhere; the packed form keeps only
                        the masked entries with a 16-bit position each).
    ``outlier_index``   int64 ``(N,)``, instead of the mask (what the runtime's ``PackedStore.read`` hands to
                        decoders): flat positions into the contiguous input shape, ``outlier_values`` then ``(N,)``.
Scales and zero points are rounded to float16 *outward* (zero down, scale up), so the stored range
still covers every entry: round trips reflect fp16 storage and the min/max error bound stays scale / 2.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..lazy import torch
from .base import FP16_BITS, OUTLIER_BITS, Encoded

if TYPE_CHECKING:
    from torch import Tensor

FP16_MAX = 65504.0


# ---- float16 storage -----------------------------------------------------------------------------


def fp16_floor(x: Tensor) -> Tensor:
    """Largest float16 <= x (x float32, clamped to the finite fp16 range): float16 tensor."""
    x = x.float().clamp(-FP16_MAX, FP16_MAX)
    h = x.half()
    return torch.where(h.float() > x, torch.nextafter(h, torch.full_like(h, -math.inf)), h)


def fp16_ceil(x: Tensor) -> Tensor:
    """Smallest float16 >= x (x float32, clamped to the finite fp16 range): float16 tensor."""
    x = x.float().clamp(-FP16_MAX, FP16_MAX)
    h = x.half()
    return torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, math.inf)), h)


# ---- uniform asymmetric (min/max) ----------------------------------------------------------------


def minmax_quantize(x: Tensor, bits: int, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric uniform quantization of x, one group per slice along ``dim``.

    Parameters
    ----------
    x : Tensor
        float tensor of any shape.
    bits : int
        Code width (<= 8).
    dim : int
        The axis reduced by min/max (the group axis).

    Returns
    -------
    codes : Tensor
        uint8, x's shape: ``round((x - zero) / scale)`` in ``[0, 2^bits - 1]``.
    scale, zero : Tensor
        float16, x's shape with ``dim`` of size 1: ``(max - min) / (2^bits - 1)`` and ``min``.
    """
    x = x.float()
    levels = (1 << bits) - 1
    zero = fp16_floor(x.amin(dim, keepdim=True))
    scale = fp16_ceil((x.amax(dim, keepdim=True) - zero.float()) / levels)
    s = scale.float()
    q = torch.round((x - zero.float()) / torch.where(s > 0, s, torch.ones_like(s)))
    return q.clamp(0, levels).to(torch.uint8), scale, zero


def minmax_dequantize(codes: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Inverse of ``minmax_quantize``: ``codes * scale + zero`` (broadcast), float32."""
    return codes.float() * scale.float() + zero.float()


def pad_to_multiple(x: Tensor, dim: int, multiple: int) -> Tensor:
    """Pad ``dim`` up to a multiple by repeating the last slice (min/max of a partial group unchanged)."""
    size = x.shape[dim]
    extra = -size % multiple
    if extra == 0:
        return x
    last = x.narrow(dim, size - 1, 1)
    return torch.cat([x, last.expand(*[extra if i == dim % x.dim() else -1 for i in range(x.dim())])], dim)


# ---- codebooks -----------------------------------------------------------------------------------


def uniform_codebook(bits: int) -> Tensor:
    """``linspace(-1, 1, 2^bits)``, float32 ``(2^bits,)``."""
    return torch.linspace(-1.0, 1.0, 1 << bits)


def normal_float_codebook(bits: int) -> Tensor:
    """NormalFloat levels ``(2^bits,)`` sorted in [-1, 1] with an exact 0 (QLoRA's NF construction).

    ``2^(bits-1)`` positive and ``2^(bits-1) - 1`` negative standard-normal quantiles, evenly spaced in
    probability between 1/2 and an offset halfway between ``1 - 1/(2(2^b - 1))`` and ``1 - 1/(2 * 2^b)``,
    plus 0, divided by the largest magnitude.
    """
    n = 1 << bits
    offset = 0.5 * ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n)))
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, n // 2, dtype=torch.float64)[:-1])
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos])
    return (levels / levels.abs().max()).sort().values.float()


def nearest_code(y: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest entry of a sorted 1-D codebook ``(K,)`` for every element of y: uint8, y's shape.

    Uses the midpoints between neighbours (bucketize), never a ``(numel, K)`` distance matrix.
    """
    mids = ((codebook[1:] + codebook[:-1]) / 2).contiguous()  # (K - 1,)
    return torch.bucketize(y.contiguous(), mids).to(torch.uint8)


def nearest_code_heads(y: Tensor, codebook: Tensor) -> Tensor:
    """``nearest_code`` with a codebook ``(K,)`` shared by all heads or ``(H, K)`` one per head (axis 1 of y)."""
    if codebook.dim() == 1:
        return nearest_code(y, codebook)
    return torch.stack([nearest_code(y.select(1, h), codebook[h]) for h in range(codebook.shape[0])], dim=1)


def lookup_heads(codebook: Tensor, codes: Tensor) -> Tensor:
    """Centroids of ``codes`` (head axis 1) in a codebook ``(K,)`` or ``(H, K)``: one ``index_select`` with 32-bit
    indices (on the CPU several times faster than advanced indexing with int64 codes)."""
    index = codes.to(torch.int32)
    if codebook.dim() == 2:  # per head: row h starts at h * K of the flattened codebook
        k = codebook.shape[1]
        index = index + torch.arange(0, codebook.numel(), k, device=codes.device, dtype=torch.int32).view(
            1, -1, *([1] * (codes.dim() - 2)))
    return codebook.reshape(-1).index_select(0, index.reshape(-1)).view(codes.shape)


def dequantize_codes(codebook: Tensor, codes: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``denormalize(lookup_heads(codebook, codes), lo, hi)``: the same float operations on every entry, with the
    part that depends only on the code evaluated once per code.

    ``codebook (K,)`` or ``(H, K)``; ``codes (B, H, T, D)``. ``lo``, ``hi`` per channel ``(1, H, 1, D)``: the whole
    formula becomes a ``(H, D, K)`` table, read with one gather. Otherwise (per vector, e.g. ``(B, H, T, 1)``): a
    table of ``(c + 1) / 2``, then one multiply and one add. Returns float32 ``(B, H, T, D)``."""
    b, h, t, d = codes.shape
    k = codebook.shape[-1]
    if lo.dim() == 4 and lo.shape[0] == lo.shape[2] == 1 and lo.shape[-1] == d and hi.shape == lo.shape:
        table = denormalize(codebook.view(-1, 1, k), lo[0, :, 0, :, None], hi[0, :, 0, :, None]).expand(h, d, k)
        base = torch.arange(0, h * d * k, k, device=codes.device, dtype=torch.int32).view(1, h, 1, d)  # (h, d) -> row
        return table.reshape(-1).index_select(0, (codes + base).reshape(-1)).view(b, h, t, d)
    return lo + lookup_heads((codebook + 1) / 2, codes) * (hi - lo)  # = lo + (y + 1) / 2 * (hi - lo)


# ---- normalization to [-1, 1] and outliers -------------------------------------------------------


def normalize(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``2 (x - lo) / (hi - lo) - 1`` clamped to [-1, 1] (broadcast; a zero range maps to -1)."""
    span = hi - lo
    return (2 * (x - lo) / torch.where(span > 0, span, torch.ones_like(span)) - 1).clamp(-1, 1)


def denormalize(y: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Inverse of ``normalize``: ``lo + (y + 1) / 2 (hi - lo)``."""
    return lo + (y + 1) / 2 * (hi - lo)


def outliers_per_side(fraction: float, dim: int) -> int:
    """Outliers kept on each side of a vector of ``dim`` entries: ``max(1, round(fraction * dim / 2))``, 0 at 0."""
    if fraction <= 0:
        return 0
    return max(1, min(round(fraction * dim / 2), (dim - 1) // 2))


def vector_normalize(x: Tensor, n_out: int) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Per-vector normalization with the ``n_out`` largest and smallest entries set aside as outliers.

    Parameters
    ----------
    x : Tensor
        ``(..., D)``.
    n_out : int
        Outliers per side (0: none; the vector's min/max set the range).

    Returns
    -------
    y : Tensor
        ``(..., D)`` float32 in [-1, 1] (outliers clipped).
    scale, zero : Tensor
        ``(..., 1)`` float16: the inliers' range ``max - min`` (rounded up) and ``min`` (rounded down).
    mask : Tensor or None
        ``(..., D)`` bool outlier mask, exactly ``2 n_out`` per vector.
    """
    x = x.float()
    if n_out > 0:
        srt = x.sort(dim=-1)
        mask = torch.zeros_like(x, dtype=torch.bool)
        mask.scatter_(-1, srt.indices[..., :n_out], True)
        mask.scatter_(-1, srt.indices[..., -n_out:], True)
        lo, hi = srt.values[..., n_out : n_out + 1], srt.values[..., -n_out - 1 : -n_out]  # (..., 1)
    else:
        mask, lo, hi = None, x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    zero = fp16_floor(lo)
    scale = fp16_ceil(hi - zero.float())
    return normalize(x, zero.float(), zero.float() + scale.float()), scale, zero, mask


def token_outlier_mask(x: Tensor, n_out: int) -> Tensor | None:
    """KVQuant's per-token outliers: the ``n_out`` largest and smallest entries of each token over all heads.

    ``x (B, H, T, D)`` -> bool mask of the same shape with exactly ``2 n_out`` entries per token (None at 0):
    the largest first, then the smallest of the rest; ties go to the lowest ``h * D + d`` (as the fused append
    kernel, ``kvq_kernels.append``, selects them).
    """
    if n_out <= 0:
        return None
    b, h, t, d = x.shape
    row = x.float().permute(0, 2, 1, 3).reshape(b, t, h * d)  # (B, T, H*D)
    mask = torch.zeros_like(row, dtype=torch.bool)
    mask.scatter_(-1, row.sort(dim=-1, descending=True, stable=True).indices[..., :n_out], True)
    rest = row.masked_fill(mask, float("inf"))
    mask.scatter_(-1, rest.sort(dim=-1, stable=True).indices[..., :n_out], True)
    return mask.view(b, t, h, d).permute(0, 2, 1, 3)


def masked_vector_normalize(x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Per-vector normalization ``x (..., D)`` over the entries outside ``mask`` (all entries when None).

    Returns ``y`` float32 in [-1, 1] and ``scale``, ``zero`` float16 ``(..., 1)`` (rounded outward).
    """
    x = x.float()
    if mask is None:
        lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    else:
        lo = x.masked_fill(mask, float("inf")).amin(-1, keepdim=True)
        hi = x.masked_fill(mask, float("-inf")).amax(-1, keepdim=True)
        empty = torch.isinf(lo)  # a vector whose entries are all outliers keeps its own range
        lo = torch.where(empty, x.amin(-1, keepdim=True), lo)
        hi = torch.where(empty, x.amax(-1, keepdim=True), hi)
    zero = fp16_floor(lo)
    scale = fp16_ceil(hi - zero.float())
    return normalize(x, zero.float(), zero.float() + scale.float()), scale, zero


def channel_thresholds(x: Tensor, fraction: float) -> tuple[Tensor, Tensor]:
    """Per-channel ``fraction / 2`` lower and upper quantiles (linear interpolation) over the first axis.

    ``x (N, H, D)`` -> ``lo, hi (H, D)`` float32; min and max at fraction 0.
    """
    srt = x.float().sort(dim=0).values  # (N, H, D)
    n = srt.shape[0]

    def quantile(q: float) -> Tensor:
        pos = q * (n - 1)
        i = min(int(math.floor(pos)), n - 1)
        j = min(i + 1, n - 1)
        return srt[i] + (pos - i) * (srt[j] - srt[i])

    return quantile(fraction / 2), quantile(1 - fraction / 2)


def with_outliers(enc: Encoded, x: Tensor, mask: Tensor | None) -> Encoded:
    """Add ``outlier_mask`` and dense fp16 ``outlier_values`` (x where masked, 0 elsewhere) to an encoding."""
    if mask is not None:
        enc["outlier_mask"] = mask
        enc["outlier_values"] = torch.where(mask, x.float(), torch.zeros((), device=x.device)).half()
    return enc


def restore_outliers(x: Tensor, enc: Encoded) -> Tensor:
    """Put an encoding's outlier values back into a reconstruction ``x`` (same shape), float32.

    The runtime's sparse form (``outlier_index``, ``PackedStore.read``) is written into ``x`` in place: pass a
    reconstruction the decoder owns."""
    if "outlier_index" in enc:
        x = x.contiguous()
        x.view(-1).index_put_((enc["outlier_index"],), enc["outlier_values"].float())
        return x
    if "outlier_mask" not in enc:
        return x
    return torch.where(enc["outlier_mask"], enc["outlier_values"].float(), x)


def packed_bits(enc: Encoded, bits: int) -> int:
    """Exact packed size: ``codes`` at ``bits`` each, fp16 ``scale``/``zero`` at 16, outliers at 32 each."""
    total = enc["codes"].numel() * bits
    total += sum(enc[key].numel() * FP16_BITS for key in ("scale", "zero") if key in enc)
    if "outlier_mask" in enc:
        total += int(enc["outlier_mask"].sum()) * OUTLIER_BITS
    return int(total)


# ---- Q-Norm ---------------------------------------------------------------------------------------


def q_norm(codebook: Tensor, y: Tensor, weights: Tensor | None = None) -> Tensor:
    """Shift and rescale a sorted codebook ``(K,)`` so the reconstruction of ``y (M,)`` keeps y's (weighted)
    mean and standard deviation: ``c' = (c - mu_q) sd / sd_q + mu``, clamped to [-1, 1] and sorted."""
    w = torch.ones_like(y) if weights is None or float(weights.sum()) <= 0 else weights.float()
    w = w.double() / w.double().sum()
    yq = codebook[nearest_code(y, codebook).long()]

    def stats(v: Tensor) -> tuple[Tensor, Tensor]:
        mu = (w * v.double()).sum()
        return mu, (w * (v.double() - mu) ** 2).sum().sqrt()

    mu, sd = stats(y)
    mu_q, sd_q = stats(yq)
    ratio = sd / sd_q if float(sd_q) > 0 else torch.ones((), dtype=torch.float64)
    out = (codebook.double() - mu_q) * ratio + mu
    return out.clamp(-1, 1).sort().values.float()
