"""``kvquant``: per-channel pre-RoPE keys, sensitivity-weighted NUQ, dense-and-sparse outliers, Q-Norm.

KVQuant (arXiv 2401.18079). Keys are normalized per channel to [-1, 1] with thresholds calibrated
offline (entries beyond them are sparse fp16 outliers); values (and keys with ``per_channel=False``)
are normalized per (token, head) vector with the range of its inliers, after setting aside the ``n``
largest and ``n`` smallest entries of the token over all KV heads (``n = max(1, round(outliers * H * D / 2))``,
KVQuant's per-token top-k). One non-uniform codebook of ``2^bits``
levels per layer for K and one for V, fitted by 1-D k-means over normalized calibration entries
weighted by their Fisher information, then shifted/rescaled by Q-Norm. Each switch turns one ingredient
off for ablations. The first ``sink`` tokens stay in fp16 (handled by the caller).

With ``head_codebooks`` (not in the paper; off by default) each KV head gets its own codebooks.

Layer state: ``key_codebook``, ``value_codebook`` ``(2^bits,)`` (``(H, 2^bits)`` per head) sorted in [-1, 1]; with
``per_channel`` also ``key_lo``, ``key_hi`` ``(H, D)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..calibration.kmeans import weighted_kmeans
from ..errors import KvqError
from .base import FP16_BITS, OUTLIER_BITS, Encoded, KVMethod, LayerCalibration, State, as_float
from .quant_ops import (
    channel_thresholds,
    dequantize_codes,
    fp16_ceil,
    fp16_floor,
    masked_vector_normalize,
    nearest_code_heads,
    normalize,
    outliers_per_side,
    packed_bits,
    q_norm,
    restore_outliers,
    token_outlier_mask,
    uniform_codebook,
    with_outliers,
)
from .registry import register

#: Calibration entries k-means sees at most (a seeded subsample beyond).
MAX_KMEANS_POINTS = 1 << 20


@register
@dataclass
class KVQuant(KVMethod):
    """KVQuant. Encodings of ``x (B, H, T, D)``:

    keys (per channel): ``codes`` uint8 ``(B, H, T, D)``; with outliers ``outlier_mask`` bool and
    ``outlier_values`` float16 ``(B, H, T, D)``.
    values, per-token keys: the same plus ``scale`` and ``zero`` float16 ``(B, H, T, 1)``.
    """

    name = "kvquant"
    needs_calibration = True
    supported_bits = (1, 2, 3, 4)

    bits: int = 4
    sink: int = 1
    outliers: float = 0.0
    per_channel: bool = True
    pre_rope: bool = True
    nuq: bool = True
    fisher: bool = True
    qnorm: bool = True
    kmeans_iters: int = 50
    seed: int = 0
    head_codebooks: bool = False
    token_scales: bool = False

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.outliers <= 0.1:
            raise KvqError(f"kvquant --outliers is a fraction in [0, 0.1] (0.01 = 1%), not {self.outliers}")
        if self.kmeans_iters < 1:
            raise KvqError(f"kvquant --kmeans-iters must be >= 1, not {self.kmeans_iters}")

    @property
    def needs_fisher(self) -> bool:  # type: ignore[override]
        """Fisher information is used only by the weighted k-means of NUQ."""
        return self.nuq and self.fisher

    @property
    def label(self) -> str:
        parts = [f"kvquant-{self.bits}b"]
        if self.outliers > 0:
            parts.append(f"{self.outliers * 100:g}%")
        if not self.pre_rope:
            parts.append("post-rope")
        if not self.per_channel:
            parts.append("per-token")
        if self.head_codebooks:
            parts.append("head-cb")
        if self.token_scales:
            parts.append("token-scales")
        if not self.nuq:
            parts.append("uniform")
        else:
            parts += [] if self.fisher else ["no-fisher"]
            parts += [] if self.qnorm else ["no-qnorm"]
        return "-".join(parts)

    @property
    def keys_pre_rope(self) -> bool:
        return self.pre_rope

    @property
    def key_outlier_fraction(self) -> float:
        return self.outliers if self.per_channel else 0.0

    # ---- calibration ---------------------------------------------------------------------------
    def fit(self, calib: LayerCalibration) -> State:
        """Thresholds (per-channel keys) and the K and V codebooks from ``(N, H, D)`` calibration samples."""
        keys, values = as_float(calib.keys), as_float(calib.values)
        state: State = {}
        if self.per_channel:
            if calib.key_lo is not None and calib.key_hi is not None:
                lo, hi = calib.key_lo, calib.key_hi
            else:
                lo, hi = channel_thresholds(keys, self.outliers)
            state["key_lo"] = fp16_floor(lo.to(keys.device)).float()  # (H, D), stored fp16: rounded outward
            state["key_hi"] = fp16_ceil(hi.to(keys.device)).float()
            y = normalize(keys, state["key_lo"], state["key_hi"])  # (N, H, D)
            mask = (keys < state["key_lo"]) | (keys > state["key_hi"]) if self.outliers > 0 else None
        else:
            y, mask = self._normalize_samples(keys)
        state["key_codebook"] = self._fit_codebook(y, mask, calib.key_fisher)
        y, mask = self._normalize_samples(values)
        state["value_codebook"] = self._fit_codebook(y, mask, calib.value_fisher)
        return state

    def _fit_codebook(self, y: Tensor, mask: Tensor | None, fisher: Tensor | None) -> Tensor:
        """``(2^bits,)`` codebook (``(H, 2^bits)`` with head_codebooks) from normalized ``y (N, H, D)``."""
        if not self.nuq:
            return uniform_codebook(self.bits).to(y.device)
        if self.head_codebooks:
            part = (lambda t, h: None if t is None else t[:, h : h + 1])  # noqa: E731 - (N, 1, D)
            return torch.stack([self._fit_one(part(y, h), part(mask, h), part(fisher, h)) for h in range(y.shape[1])])
        return self._fit_one(y, mask, fisher)

    def _fit_one(self, y: Tensor, mask: Tensor | None, fisher: Tensor | None) -> Tensor:
        """One ``(2^bits,)`` codebook from the normalized entries ``y`` (outliers in ``mask`` dropped)."""
        if self.fisher and fisher is None:
            raise KvqError("kvquant with fisher=True needs Fisher information in the calibration (or fisher=False)")
        keep = torch.ones_like(y, dtype=torch.bool) if mask is None else ~mask
        pts = y[keep]  # (M,)
        w = fisher.float()[keep] if self.fisher and fisher is not None else None  # (M,)
        if pts.numel() > MAX_KMEANS_POINTS:
            gen = torch.Generator().manual_seed(self.seed)  # CPU draws: the same subsample on every device
            sub = torch.randperm(pts.numel(), generator=gen)[:MAX_KMEANS_POINTS].to(pts.device)
            pts, w = pts[sub], None if w is None else w[sub]
        c = weighted_kmeans(pts, 1 << self.bits, w, iters=self.kmeans_iters, seed=self.seed)  # (2^bits,)
        if self.qnorm:
            c = q_norm(c, pts, w)
        return c.half().float().sort().values

    # ---- keys ----------------------------------------------------------------------------------
    def encode_keys(self, k: Tensor, state: State) -> Encoded:
        x = as_float(k)
        codebook = state["key_codebook"].to(x.device)
        if not self.per_channel:
            return self._encode_vectors(x, codebook)
        lo = state["key_lo"].to(x.device)[None, :, None, :]  # (1, H, 1, D)
        hi = state["key_hi"].to(x.device)[None, :, None, :]
        enc = {"codes": nearest_code_heads(normalize(x, lo, hi), codebook)}  # (B, H, T, D)
        return with_outliers(enc, x, (x < lo) | (x > hi) if self.outliers > 0 else None)

    def decode_keys(self, enc: Encoded, state: State) -> Tensor:
        codebook = state["key_codebook"].to(enc["codes"].device)
        if not self.per_channel:
            return self._decode_vectors(enc, codebook)
        lo = state["key_lo"].to(codebook.device)[None, :, None, :]  # (1, H, 1, D)
        hi = state["key_hi"].to(codebook.device)[None, :, None, :]
        return restore_outliers(dequantize_codes(codebook, enc["codes"], lo, hi), enc)

    # ---- values --------------------------------------------------------------------------------
    def encode_values(self, v: Tensor, state: State) -> Encoded:
        x = as_float(v)
        return self._encode_vectors(x, state["value_codebook"].to(x.device))

    def decode_values(self, enc: Encoded, state: State) -> Tensor:
        return self._decode_vectors(enc, state["value_codebook"].to(enc["codes"].device))

    def _normalize_samples(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Calibration samples ``(N, H, D)`` normalized as ``_encode_vectors`` would: ``y`` and outlier mask."""
        xt = x.transpose(0, 1)[None]  # (1, H, N, D)
        mask = token_outlier_mask(xt, outliers_per_side(self.outliers, x.shape[1] * x.shape[2]))
        y, _, _ = self._normalize(xt, mask)
        back = (lambda t: t[0].transpose(0, 1))  # noqa: E731 - (1, H, N, D) -> (N, H, D)
        return back(y), None if mask is None else back(mask)

    def _encode_vectors(self, x: Tensor, codebook: Tensor) -> Encoded:
        """Per-vector normalization after KVQuant's per-token top-k outliers: ``x (B, H, T, D)``."""
        b, h, t, d = x.shape
        mask = token_outlier_mask(x, outliers_per_side(self.outliers, h * d))
        y, scale, zero = self._normalize(x, mask)
        return with_outliers({"codes": nearest_code_heads(y, codebook), "scale": scale, "zero": zero}, x, mask)

    def _normalize(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """``x (B, H, T, D)`` -> ``y`` in [-1, 1], ``scale``/``zero`` ``(B, H, T, 1)``, or ``(B, 1, T, 1)`` with
        ``token_scales`` (one range per token over all KV heads, as KVQuant: fewer bits, coarser)."""
        if not self.token_scales:
            return masked_vector_normalize(x, mask)
        b, h, t, d = x.shape
        rows = (lambda z: z.permute(0, 2, 1, 3).reshape(b, t, h * d))  # noqa: E731 - (B, H, T, D) -> (B, T, H*D)
        y, scale, zero = masked_vector_normalize(rows(x), None if mask is None else rows(mask))
        y = y.view(b, t, h, d).permute(0, 2, 1, 3)  # (B, H, T, D)
        return y, scale.view(b, 1, t, 1), zero.view(b, 1, t, 1)

    def _decode_vectors(self, enc: Encoded, codebook: Tensor) -> Tensor:
        zero = enc["zero"].float()  # (B, H, T, 1), or (B, 1, T, 1) with token_scales
        x = dequantize_codes(codebook, enc["codes"], zero, zero + enc["scale"].float())  # (B, H, T, D)
        return restore_outliers(x, enc)

    # ---- artifact checks -----------------------------------------------------------------------
    def state_shapes(self, kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
        book = (kv_heads, 1 << self.bits) if self.head_codebooks and self.nuq else (1 << self.bits,)
        shapes = {"key_codebook": book, "value_codebook": book}
        if self.per_channel:
            shapes.update(key_lo=(kv_heads, head_dim), key_hi=(kv_heads, head_dim))
        return shapes

    def check_state(self, state: State) -> str | None:
        """Codebooks sorted (nearest-code search relies on it), ``key_lo <= key_hi``."""
        for name in ("key_codebook", "value_codebook"):
            if (state[name].diff(dim=-1) < 0).any():
                return f"{name} is not sorted"
        if self.per_channel and (state["key_lo"] > state["key_hi"]).any():
            return "key_lo exceeds key_hi"
        return None

    # ---- bit accounting ------------------------------------------------------------------------
    def encoded_bits(self, enc: Encoded) -> int:
        return packed_bits(enc, self.bits)

    def state_bits_estimate(self, kv_heads: int, head_dim: int) -> int:
        """Two ``2^bits`` codebooks (per head with head_codebooks), plus ``key_lo``/``key_hi`` ``(H, D)``, in fp16."""
        books = 2 * (1 << self.bits) * (kv_heads if self.head_codebooks and self.nuq else 1)
        return FP16_BITS * (books + (2 * kv_heads * head_dim if self.per_channel else 0))

    def bits_per_token(self, kv_heads: int, head_dim: int) -> float:
        token_outliers = 2 * outliers_per_side(self.outliers, kv_heads * head_dim) * OUTLIER_BITS
        scales = 2 * FP16_BITS * (1 if self.token_scales else kv_heads)  # one scale + zero per token or per head
        per_token = kv_heads * head_dim * self.bits + scales + token_outliers  # codes, scale, zero, outliers
        key = kv_heads * head_dim * (self.bits + self.outliers * OUTLIER_BITS) if self.per_channel else per_token
        return float(key + per_token)
