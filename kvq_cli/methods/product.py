"""``pq``: MILLION, product quantization of K/V head vectors with codebooks shared across heads.

MILLION (DAC 2025). Each head vector of ``head_dim`` D is split into M subspaces of ``D / M`` dims; per
layer, each subspace has one codebook of ``2^nbits`` centroids shared by all KV heads, learned by plain
(unweighted) k-means on sampled calibration vectors of every head pooled together. The code of a vector
is its M centroid indices: ``M * nbits / D`` bits per element (M = D / 2, 8 bits: 4 bits per element).
Keys are quantized after RoPE, so attention scores can be computed straight from the codes with a table
per query (``lookup_scores``, MILLION's asymmetric distance computation). Recent tokens stay full
precision (``residual``, handled by the caller).

Layer state: ``key_codebook``, ``value_codebook`` float32 ``(M, 2^nbits, D / M)``, rounded to fp16 values (the
runtime cache stores them in fp16, as ``state_bits`` charges).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import KvqError
from .base import FP16_BITS, Encoded, KVMethod, LayerCalibration, State, as_float
from .coupled import code_dtype, fit_codebooks, nearest_centroids
from .quant_ops import packed_bits
from .registry import register


@register
@dataclass
class ProductQuantization(KVMethod):
    """MILLION product quantization. Encoding of ``x (B, H, T, D)``: ``codes`` int16 ``(B, H, T, M)``."""

    name = "pq"
    needs_calibration = True

    bits: int = 8
    subspaces: int = 0  # M; 0: head_dim / 2 (2 dims per subspace)
    residual: int = 128
    sink: int = 0
    kmeans_iters: int = 25
    seed: int = 0
    max_samples: int = 16384

    def validate(self) -> None:
        super().validate()
        if not 1 <= self.bits <= 12:
            raise KvqError(f"pq bits (per subspace code) must be in 1..12, not {self.bits}")
        if self.subspaces < 0:
            raise KvqError(f"pq subspaces must be >= 0 (0: head_dim / 2), not {self.subspaces}")
        if self.kmeans_iters < 1:
            raise KvqError(f"pq --kmeans-iters must be >= 1, not {self.kmeans_iters}")
        if self.max_samples < 1:
            raise KvqError(f"pq --max-samples must be >= 1, not {self.max_samples}")

    @property
    def label(self) -> str:
        """``pq-m32x8b``; ``pq-d2x8b`` with the default M = head_dim / 2 (2 dims per subspace)."""
        return f"pq-m{self.subspaces}x{self.bits}b" if self.subspaces else f"pq-d2x{self.bits}b"

    def _subspaces(self, head_dim: int) -> int:
        """M for this head_dim; ``KvqError`` when it does not divide head_dim."""
        m = self.subspaces or max(1, head_dim // 2)
        if head_dim % m:
            raise KvqError(f"pq subspaces={m} must divide head_dim={head_dim}")
        return m

    # ---- calibration ---------------------------------------------------------------------------
    def fit(self, calib: LayerCalibration) -> State:
        keys, values = as_float(calib.keys), as_float(calib.values)
        return {"key_codebook": self._fit_one(keys), "value_codebook": self._fit_one(values)}

    def _fit_one(self, x: Tensor) -> Tensor:
        """``(M, 2^nbits, D / M)`` codebooks from ``x (N, H, D)``, the heads' vectors pooled per subspace."""
        n, h, d = x.shape
        m = self._subspaces(d)
        pts = x.reshape(n * h, m, d // m).transpose(0, 1)  # (M, N*H, d_m)
        books = fit_codebooks(pts, 1 << self.bits, None, self.kmeans_iters, self.seed, self.max_samples)
        return books.half().float().contiguous()  # stored fp16, as charged

    # ---- encode / decode -----------------------------------------------------------------------
    def _encode(self, x: Tensor, codebook: Tensor) -> Encoded:
        x = as_float(x)
        b, h, t, d = x.shape
        m = self._subspaces(d)
        codebook = codebook.to(x.device)
        if codebook.shape[0] != m or codebook.shape[-1] != d // m:
            raise KvqError(f"pq codebook {tuple(codebook.shape)} does not fit vectors of {d} dims")
        pts = x.reshape(b * h * t, m, d // m).transpose(0, 1)  # (M, B*H*T, d_m)
        idx = nearest_centroids(pts, codebook, code_dtype(self.bits))  # (M, B*H*T)
        return {"codes": idx.transpose(0, 1).reshape(b, h, t, m).contiguous()}

    def _decode(self, enc: Encoded, codebook: Tensor) -> Tensor:
        codes = enc["codes"].long()  # (B, H, T, M)
        b, h, t, m = codes.shape
        codebook = codebook.to(codes.device).float()  # (M, K, d_m)
        x = codebook[torch.arange(m, device=codes.device), codes]  # (B, H, T, M, d_m)
        return x.reshape(b, h, t, m * codebook.shape[-1])

    def encode_keys(self, k: Tensor, state: State) -> Encoded:
        return self._encode(k, state["key_codebook"])

    def decode_keys(self, enc: Encoded, state: State) -> Tensor:
        return self._decode(enc, state["key_codebook"])

    def encode_values(self, v: Tensor, state: State) -> Encoded:
        return self._encode(v, state["value_codebook"])

    def decode_values(self, enc: Encoded, state: State) -> Tensor:
        return self._decode(enc, state["value_codebook"])

    def lookup_scores(self, q: Tensor, enc: Encoded, state: State) -> Tensor:
        """Attention logits ``q . k`` (unscaled) straight from the key codes (asymmetric distance computation).

        ``q (B, Hq, Tq, D)`` post-RoPE queries, ``Hq`` a multiple of the KV heads H (GQA: query head i reads
        KV head ``i // (Hq / H)``); ``enc`` from ``encode_keys`` with codes ``(B, H, Tk, M)``. A table
        ``T[b, hq, tq, m, j] = q_m . c_{m, j}`` per query, then each key's score is ``sum_m T[..., m, code_m]``.
        Returns ``(B, Hq, Tq, Tk)`` float32, equal to ``q @ decode_keys(enc).T`` up to rounding.
        """
        codes = enc["codes"].long()  # (B, H, Tk, M)
        b, h, tk, m = codes.shape
        bq, hq, tq, d = q.shape
        if bq != b or hq % h:
            raise KvqError(f"queries {tuple(q.shape)} do not match key codes {tuple(codes.shape)}")
        codebook = state["key_codebook"].to(q.device).float()  # (M, K, d_m)
        table = torch.einsum("bhtmd,mkd->bhtmk", as_float(q).reshape(b, hq, tq, m, d // m), codebook)
        codes = codes.repeat_interleave(hq // h, dim=1)  # (B, Hq, Tk, M)
        scores = torch.zeros(b, hq, tq, tk, device=q.device)
        for j in range(m):
            idx = codes[:, :, None, :, j].expand(b, hq, tq, tk)
            scores += table[:, :, :, j].gather(-1, idx)  # (B, Hq, Tq, Tk)
        return scores

    # ---- bit accounting ------------------------------------------------------------------------
    def encoded_bits(self, enc: Encoded) -> int:
        """``nbits`` per subspace code."""
        return packed_bits(enc, self.bits)

    def bits_per_token(self, kv_heads: int, head_dim: int) -> float:
        return float(2 * kv_heads * self._subspaces(head_dim) * self.bits)

    def state_bits_estimate(self, kv_heads: int, head_dim: int) -> int:
        """Two codebooks ``(M, 2^nbits, D / M)`` in fp16."""
        return FP16_BITS * 2 * (1 << self.bits) * head_dim
