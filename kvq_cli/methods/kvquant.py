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

Mixed widths (not in the paper): ``value_bits`` gives values their own width (0: ``bits``); ``layer_bits`` gives each
layer its key and value widths, two digits per layer joined by dashes (``"32-43-22"``: layer 0 keys 3 bits, values
2...), as ``kvq calibrate --avg-bits`` chooses them (``calibration.allocate``); ``bits`` is then the widest of them
and ``for_layer(i)`` the configuration layer ``i`` runs.

Layer state: ``key_codebook``, ``value_codebook`` ``(2^bits,)`` (``(H, 2^bits)`` per head) sorted in [-1, 1]; with
``per_channel`` also ``key_lo``, ``key_hi`` ``(H, D)``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import KvqError
from ..lazy import torch
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

if TYPE_CHECKING:
    from torch import Tensor

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
    value_bits: int = 0
    layer_bits: str = ""

    def validate(self) -> None:
        super().validate()
        if self.value_bits and self.value_bits not in self.supported_bits:
            raise KvqError(f"kvquant value_bits is 0 (= bits) or one of {list(self.supported_bits)}, not "
                           f"{self.value_bits}")
        if self.layer_bits:
            if not re.fullmatch(r"[1-4]{2}(-[1-4]{2})*", self.layer_bits):
                raise KvqError("kvquant layer_bits is two digits 1-4 per layer (key, value) joined by dashes, e.g. "
                               f"32-43-22, not {self.layer_bits[:40]!r}")
            widest = max(int(c) for c in self.layer_bits if c != "-")
            if self.bits != widest or self.value_bits:
                raise KvqError(f"kvquant with layer_bits takes bits = its widest width ({widest}) and no value_bits")
        if not 0.0 <= self.outliers <= 0.1:
            raise KvqError(f"kvquant --outliers is a fraction in [0, 0.1] (0.01 = 1%), not {self.outliers}")
        if self.kmeans_iters < 1:
            raise KvqError(f"kvquant --kmeans-iters must be >= 1, not {self.kmeans_iters}")

    @property
    def needs_fisher(self) -> bool:  # type: ignore[override]
        """Fisher information is used only by the weighted k-means of NUQ."""
        return self.nuq and self.fisher

    def widths(self) -> list[tuple[int, int]]:
        """``(key bits, value bits)`` per layer from ``layer_bits`` (``[]`` without it)."""
        return [(int(p[0]), int(p[1])) for p in self.layer_bits.split("-")] if self.layer_bits else []

    def for_layer(self, index: int) -> KVQuant:
        if not self.layer_bits:
            return self
        widths = self.widths()
        if not 0 <= index < len(widths):
            raise KvqError(f"kvquant layer_bits gives {len(widths)} layers, not layer {index}")
        k, v = widths[index]
        return dataclasses.replace(self, bits=k, value_bits=v, layer_bits="")

    def stream_bits(self, is_key: bool) -> int:
        return self.bits if is_key or not self.value_bits else self.value_bits

    @property
    def label(self) -> str:
        if self.layer_bits:
            mean = sum(k + v for k, v in self.widths()) / (2 * len(self.widths()))
            parts = [f"kvquant-mix{mean:.3g}b"]
        elif self.value_bits and self.value_bits != self.bits:
            parts = [f"kvquant-k{self.bits}v{self.value_bits}b"]
        else:
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
        if self.residual:
            parts.append(f"r{self.residual}")
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
        if self.layer_bits:
            raise KvqError("kvquant with layer_bits is fitted layer by layer: call for_layer(i).fit")
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
        state["key_codebook"] = self._fit_codebook(y, mask, calib.key_fisher, self.stream_bits(True))
        y, mask = self._normalize_samples(values)
        state["value_codebook"] = self._fit_codebook(y, mask, calib.value_fisher, self.stream_bits(False))
        return state

    def _fit_codebook(self, y: Tensor, mask: Tensor | None, fisher: Tensor | None, bits: int) -> Tensor:
        """``(2^bits,)`` codebook (``(H, 2^bits)`` with head_codebooks) from normalized ``y (N, H, D)``."""
        if not self.nuq:
            return uniform_codebook(bits).to(y.device)
        if self.head_codebooks:
            part = (lambda t, h: None if t is None else t[:, h : h + 1])  # noqa: E731 - (N, 1, D)
            return torch.stack([self._fit_one(part(y, h), part(mask, h), part(fisher, h), bits)
                                for h in range(y.shape[1])])
        return self._fit_one(y, mask, fisher, bits)

    def _fit_one(self, y: Tensor, mask: Tensor | None, fisher: Tensor | None, bits: int) -> Tensor:
        """One ``(2^bits,)`` codebook from the normalized entries ``y`` (outliers in ``mask`` dropped)."""
        from ..calibration.kmeans import weighted_kmeans

        if self.fisher and fisher is None:
            raise KvqError("kvquant with fisher=True needs Fisher information in the calibration (or fisher=False)")
        keep = torch.ones_like(y, dtype=torch.bool) if mask is None else ~mask
        pts = y[keep]  # (M,)
        w = fisher.float()[keep] if self.fisher and fisher is not None else None  # (M,)
        if pts.numel() > MAX_KMEANS_POINTS:
            gen = torch.Generator().manual_seed(self.seed)  # CPU draws: the same subsample on every device
            sub = torch.randperm(pts.numel(), generator=gen)[:MAX_KMEANS_POINTS].to(pts.device)
            pts, w = pts[sub], None if w is None else w[sub]
        c = weighted_kmeans(pts, 1 << bits, w, iters=self.kmeans_iters, seed=self.seed)  # (2^bits,)
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
        """One layer's tensors (with ``layer_bits``: ask ``for_layer(i)``; each layer has its own widths)."""
        heads = (kv_heads,) if self.head_codebooks and self.nuq else ()
        shapes = {"key_codebook": (*heads, 1 << self.stream_bits(True)),
                  "value_codebook": (*heads, 1 << self.stream_bits(False))}
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
    def encoded_bits(self, enc: Encoded, is_key: bool = True) -> int:
        """``KVMethod.encoded_bits`` of a key (``is_key``) or value encoding (their widths may differ)."""
        return packed_bits(enc, self.stream_bits(is_key))

    def _mean_over_layers(self, fn) -> float:
        """With ``layer_bits``: the mean of ``fn(for_layer(i))`` over layers (the accounting counts layers alike)."""
        layers = [self.for_layer(i) for i in range(len(self.widths()))]
        return sum(fn(m) for m in layers) / len(layers)

    def state_bits_estimate(self, kv_heads: int, head_dim: int) -> int:
        """The K and V codebooks (``2^bits`` each, per head with head_codebooks), plus ``key_lo``/``key_hi``
        ``(H, D)``, in fp16 (with ``layer_bits``: the mean over layers, rounded)."""
        if self.layer_bits:
            return round(self._mean_over_layers(lambda m: m.state_bits_estimate(kv_heads, head_dim)))
        books = sum(1 << self.stream_bits(s) for s in (True, False)) * (
            kv_heads if self.head_codebooks and self.nuq else 1)
        return FP16_BITS * (books + (2 * kv_heads * head_dim if self.per_channel else 0))

    def bits_per_token(self, kv_heads: int, head_dim: int) -> float:
        """Keys and values of one token in one layer (with ``layer_bits``: the mean over layers)."""
        if self.layer_bits:
            return self._mean_over_layers(lambda m: m.bits_per_token(kv_heads, head_dim))
        token_outliers = 2 * outliers_per_side(self.outliers, kv_heads * head_dim) * OUTLIER_BITS
        scales = 2 * FP16_BITS * (1 if self.token_scales else kv_heads)  # one scale + zero per token or per head

        def per_token(bits: int) -> float:  # codes, scale, zero, outliers
            return kv_heads * head_dim * bits + scales + token_outliers

        kb = self.stream_bits(True)
        key = kv_heads * head_dim * (kb + self.outliers * OUTLIER_BITS) if self.per_channel else per_token(kb)
        return float(key + per_token(self.stream_bits(False)))
