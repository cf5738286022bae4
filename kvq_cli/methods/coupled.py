"""``cq``: Coupled Quantization, vector quantization of groups of c contiguous channels.

CQ (arXiv 2405.03917). The channels of a K/V head vector are inter-dependent, so quantizing ``c`` of
them jointly beats quantizing each alone at the same bits per channel. Each KV head's ``head_dim``
channels are split into ``D / c`` contiguous groups; each (head, group) has its own codebook of ``2^b``
centroids in ``R^c``, learned by k-means on raw calibration vectors (pre-RoPE keys by default, values),
weighted by the Fisher information of the group (the sum over its c channels) unless ``fisher=False``.
The code of a group is the index of its nearest centroid: ``b / c`` bits per channel (CQ-2c8b = 4,
CQ-4c8b = 2, CQ-8c8b = 1).

Optional dense-and-sparse outliers (not in the paper): with ``outliers > 0`` the ``n`` largest and
``n`` smallest entries of each token over all KV heads (``n = max(1, round(outliers * H * D / 2))``)
are stored exactly in fp16 on top of the codes (everything is quantized, the outliers then restored).

When a calibration set has fewer vectors than ``2^b`` centroids, the vectors are repeated (whole copies,
so the weighted problem is unchanged) until there are at least ``2^b``; surplus centroids then duplicate
points, which is harmless.

Layer state: ``key_codebook``, ``value_codebook`` float32 ``(H, D / c, 2^b, c)``, rounded to fp16 values (the
runtime cache stores them in fp16, as ``state_bits`` charges).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import KvqError
from ..lazy import torch
from .base import FP16_BITS, OUTLIER_BITS, Encoded, KVMethod, LayerCalibration, State, as_float
from .quant_ops import outliers_per_side, packed_bits, restore_outliers, token_outlier_mask, with_outliers
from .registry import register

if TYPE_CHECKING:
    from torch import Tensor

#: Calibration vectors one k-means problem sees at most (a seeded subsample beyond).
MAX_KMEANS_VECTORS = 16384


def code_dtype(bits: int) -> torch.dtype:
    """Integer dtype of unpacked codes of ``bits`` bits (<= 15): int16."""
    return torch.int16 if bits <= 15 else torch.int32


def fit_codebooks(
    x: Tensor, k: int, weights: Tensor | None, iters: int, seed: int, max_vectors: int = MAX_KMEANS_VECTORS
) -> Tensor:
    """Batched (weighted) k-means: ``x (G, N, d)``, ``weights (G, N)`` or None -> ``(G, k, d)`` codebooks.

    At most ``max_vectors`` vectors per problem (the same seeded subsample for every problem); when there
    are fewer than ``k``, whole copies of the vectors are appended until there are at least ``k``.
    """
    from ..calibration.kmeans import weighted_kmeans

    n = x.shape[1]
    if n == 0:
        raise KvqError("no calibration vectors to fit a codebook on")
    if n > max_vectors:
        gen = torch.Generator().manual_seed(seed)  # CPU draws: the same subsample on every device
        sub = torch.randperm(n, generator=gen)[:max_vectors].to(x.device)
        x, weights = x[:, sub], None if weights is None else weights[:, sub]
        n = max_vectors
    if n < k:
        reps = -(-k // n)
        x = x.repeat(1, reps, 1)
        weights = None if weights is None else weights.repeat(1, reps)
    return weighted_kmeans(x.float(), k, weights, iters=iters, seed=seed)


def nearest_centroids(x: Tensor, codebook: Tensor, dtype: torch.dtype) -> Tensor:
    """Nearest centroid index of ``x (G, N, d)`` in ``codebook (G, k, d)``: ``(G, N)`` of ``dtype``.

    The distance matrix is built in chunks over N (``kmeans.assign``), so memory stays bounded.
    """
    from ..calibration.kmeans import assign

    idx, _ = assign(x.float(), codebook.float())
    return idx.to(dtype)


@register
@dataclass
class CoupledQuantization(KVMethod):
    """Coupled Quantization. Encoding of ``x (B, H, T, D)``: ``codes`` int16 ``(B, H, T, D / c)``; with
    outliers also ``outlier_mask`` bool and ``outlier_values`` float16 ``(B, H, T, D)``."""

    name = "cq"
    needs_calibration = True

    bits: int = 8
    channels: int = 4
    fisher: bool = True
    pre_rope: bool = True
    sink: int = 1
    kmeans_iters: int = 25
    seed: int = 0
    outliers: float = 0.0
    max_samples: int = MAX_KMEANS_VECTORS

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.bits <= 12:
            raise KvqError(f"cq bits (per centroid index) must be in 1..12, not {self.bits}")
        if self.channels < 1:
            raise KvqError(f"cq channels (per group) must be >= 1, not {self.channels}")
        if not 0.0 <= self.outliers <= 0.1:
            raise KvqError(f"cq --outliers is a fraction in [0, 0.1] (0.01 = 1%), not {self.outliers}")
        if self.kmeans_iters < 1:
            raise KvqError(f"cq --kmeans-iters must be >= 1, not {self.kmeans_iters}")
        if self.max_samples < 1:
            raise KvqError(f"cq --max-samples must be >= 1, not {self.max_samples}")

    @property
    def needs_fisher(self) -> bool:  # type: ignore[override]
        return self.fisher

    @property
    def label(self) -> str:
        parts = [f"cq-{self.channels}c{self.bits}b"]
        if self.outliers > 0:
            parts.append(f"{self.outliers * 100:g}%")
        if not self.pre_rope:
            parts.append("post-rope")
        if not self.fisher:
            parts.append("no-fisher")
        return "-".join(parts)

    @property
    def keys_pre_rope(self) -> bool:
        return self.pre_rope

    def _groups(self, head_dim: int) -> int:
        """Channel groups per head, ``D / c``; ``KvqError`` when c does not divide head_dim."""
        if head_dim % self.channels:
            raise KvqError(f"cq channels={self.channels} must divide head_dim={head_dim}")
        return head_dim // self.channels

    # ---- calibration ---------------------------------------------------------------------------
    def fit(self, calib: LayerCalibration) -> State:
        return {
            "key_codebook": self._fit_one(as_float(calib.keys), calib.key_fisher),
            "value_codebook": self._fit_one(as_float(calib.values), calib.value_fisher),
        }

    def _fit_one(self, x: Tensor, fisher: Tensor | None) -> Tensor:
        """``(H, D / c, 2^b, c)`` codebooks from calibration vectors ``x (N, H, D)``."""
        n, h, d = x.shape
        g, c = self._groups(d), self.channels
        pts = x.reshape(n, h, g, c).permute(1, 2, 0, 3).reshape(h * g, n, c)  # (H*G, N, c)
        w = None
        if self.fisher and fisher is not None:
            w = fisher.float().to(x.device).reshape(n, h, g, c).sum(-1).permute(1, 2, 0).reshape(h * g, n)
        books = fit_codebooks(pts, 1 << self.bits, w, self.kmeans_iters, self.seed, self.max_samples)  # (H*G, K, c)
        return books.reshape(h, g, 1 << self.bits, c).half().float().contiguous()  # stored fp16, as charged

    # ---- encode / decode -----------------------------------------------------------------------
    def _encode(self, x: Tensor, codebook: Tensor) -> Encoded:
        x = as_float(x)
        b, h, t, d = x.shape
        g, c = self._groups(d), self.channels
        codebook = codebook.to(x.device)
        if codebook.shape[:2] != (h, g) or codebook.shape[-1] != c:
            raise KvqError(f"cq codebook {tuple(codebook.shape)} does not fit vectors of {h} heads x {d} dims")
        pts = x.reshape(b, h, t, g, c).permute(1, 3, 0, 2, 4).reshape(h * g, b * t, c)  # (H*G, B*T, c)
        idx = nearest_centroids(pts, codebook.reshape(h * g, -1, c), code_dtype(self.bits))  # (H*G, B*T)
        codes = idx.reshape(h, g, b, t).permute(2, 0, 3, 1).contiguous()  # (B, H, T, G)
        mask = token_outlier_mask(x, outliers_per_side(self.outliers, h * d))
        return with_outliers({"codes": codes}, x, mask)

    def _decode(self, enc: Encoded, codebook: Tensor) -> Tensor:
        codes = enc["codes"].long()  # (B, H, T, G)
        b, h, t, g = codes.shape
        codebook = codebook.to(codes.device).float()  # (H, G, K, c)
        heads = torch.arange(h, device=codes.device).view(1, h, 1, 1)
        groups = torch.arange(g, device=codes.device).view(1, 1, 1, g)
        x = codebook[heads, groups, codes]  # (B, H, T, G, c)
        return restore_outliers(x.reshape(b, h, t, g * codebook.shape[-1]), enc)

    def encode_keys(self, k: Tensor, state: State) -> Encoded:
        return self._encode(k, state["key_codebook"])

    def decode_keys(self, enc: Encoded, state: State) -> Tensor:
        return self._decode(enc, state["key_codebook"])

    def encode_values(self, v: Tensor, state: State) -> Encoded:
        return self._encode(v, state["value_codebook"])

    def decode_values(self, enc: Encoded, state: State) -> Tensor:
        return self._decode(enc, state["value_codebook"])

    def state_shapes(self, kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
        shape = (kv_heads, self._groups(head_dim), 1 << self.bits, self.channels)
        return {"key_codebook": shape, "value_codebook": shape}

    # ---- bit accounting ------------------------------------------------------------------------
    def encoded_bits(self, enc: Encoded) -> int:
        """``b`` bits per group code, 32 per sparse outlier."""
        return packed_bits(enc, self.bits)

    def bits_per_token(self, kv_heads: int, head_dim: int) -> float:
        codes = kv_heads * self._groups(head_dim) * self.bits
        token_outliers = 2 * outliers_per_side(self.outliers, kv_heads * head_dim) * OUTLIER_BITS
        return float(2 * (codes + token_outliers))

    def state_bits_estimate(self, kv_heads: int, head_dim: int) -> int:
        """Two codebooks ``(H, D / c, 2^b, c)`` in fp16."""
        return FP16_BITS * 2 * kv_heads * self._groups(head_dim) * (1 << self.bits) * self.channels
