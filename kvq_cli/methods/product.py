"""``pq``: MILLION, product quantization of K/V head vectors with codebooks shared across heads.

MILLION (DAC 2025). Each head vector of ``head_dim`` D is split into M subspaces of ``D / M`` dims; per
layer, each subspace has one codebook of ``2^nbits`` centroids shared by all KV heads, learned by plain
(unweighted) k-means on sampled calibration vectors of every head pooled together. The code of a vector
is its M centroid indices: ``M * nbits / D`` bits per element (M = D / 2, 8 bits: 4 bits per element).
Keys are quantized after RoPE, so attention scores can be computed straight from the codes with a table
per query (``lookup_scores``, MILLION's asymmetric distance computation). Recent tokens stay full
precision (``residual``, handled by the caller).

Options beyond MILLION (all off by default, so ``pq:bits=8`` is MILLION as published):

* ``fisher``: k-means weighted by the Fisher information of each subvector (the sum of the squared LM-loss
  gradients over its dims; for keys, with respect to the post-RoPE keys), as ``cq`` and ``kvquant`` do.
* ``head_codebooks``: one codebook per KV head and subspace instead of one per subspace shared by the heads
  (H times the codebook memory; the Triton decode kernel takes either).
* ``rope_pairs``: key subspaces gather the channels RoPE rotates together (channel i with i + D/2, the
  ``rotate_half`` pairs) instead of contiguous channels: with 2 dims per subspace each subspace is exactly
  one rotating pair. Values keep contiguous subspaces. Lookup tables are built from the query in the same
  channel order, so scores need no decoded key either (the kernel: ``PQCache.key_order``).
* ``outliers``: dense-and-sparse outliers as ``cq``'s: the ``n`` largest and smallest entries of each token
  over all KV heads (``n = max(1, round(outliers * H * D / 2))``) are kept exactly in fp16 on top of the
  codes (keys and values; the Triton decode kernel has no outlier slots, so the runtime uses its PyTorch
  reference path for these).

Layer state: ``key_codebook``, ``value_codebook`` float32 ``(M, 2^nbits, D / M)`` (``head_codebooks``:
``(H, M, 2^nbits, D / M)``), rounded to fp16 values (the runtime cache stores them in fp16, as
``state_bits`` charges). With ``rope_pairs`` the key codebook lives in the permuted channel order
(``rope_pair_order``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import KvqError
from ..lazy import torch
from .base import FP16_BITS, OUTLIER_BITS, Encoded, KVMethod, LayerCalibration, State, as_float
from .coupled import code_dtype, fit_codebooks, nearest_centroids
from .quant_ops import outliers_per_side, packed_bits, restore_outliers, token_outlier_mask, with_outliers
from .registry import register

if TYPE_CHECKING:
    from torch import Tensor


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
    fisher: bool = False
    head_codebooks: bool = False
    rope_pairs: bool = False
    outliers: float = 0.0

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
        if not 0.0 <= self.outliers <= 0.1:
            raise KvqError(f"pq --outliers is a fraction in [0, 0.1] (0.01 = 1%), not {self.outliers}")

    @property
    def needs_fisher(self) -> bool:  # type: ignore[override]
        return self.fisher

    @property
    def label(self) -> str:
        """``pq-m32x8b``; ``pq-d2x8b`` with the default M = head_dim / 2 (2 dims per subspace); suffixes
        ``-1%`` (outliers), ``-fisher``, ``-heads`` (per-head codebooks), ``-rp`` (RoPE-pair key subspaces),
        ``-sink1`` (fp16 sink tokens)."""
        base = f"pq-m{self.subspaces}x{self.bits}b" if self.subspaces else f"pq-d2x{self.bits}b"
        flags = [(f"{self.outliers * 100:g}%", self.outliers > 0), ("fisher", self.fisher),
                 ("heads", self.head_codebooks), ("rp", self.rope_pairs), (f"sink{self.sink}", self.sink > 0)]
        return "-".join([base] + [name for name, on in flags if on])

    def _subspaces(self, head_dim: int) -> int:
        """M for this head_dim; ``KvqError`` when it does not divide head_dim."""
        m = self.subspaces or max(1, head_dim // 2)
        if head_dim % m:
            raise KvqError(f"pq subspaces={m} must divide head_dim={head_dim}")
        return m

    # ---- calibration ---------------------------------------------------------------------------
    def fit(self, calib: LayerCalibration) -> State:
        keys, values = as_float(calib.keys), as_float(calib.values)
        kf, vf = (calib.key_fisher, calib.value_fisher) if self.fisher else (None, None)
        if self.rope_pairs:
            order = rope_pair_order(keys.shape[-1], keys.device)
            keys, kf = keys[..., order], None if kf is None else kf[..., order]
        return {"key_codebook": self._fit_one(keys, kf), "value_codebook": self._fit_one(values, vf)}

    def _fit_one(self, x: Tensor, fisher: Tensor | None = None) -> Tensor:
        """Codebooks from ``x (N, H, D)``: ``(M, 2^nbits, D / M)``, the heads' vectors pooled per subspace, or
        ``(H, M, 2^nbits, D / M)`` with ``head_codebooks``; weighted by ``fisher (N, H, D)`` when given."""
        n, h, d = x.shape
        m = self._subspaces(d)
        pts = x.reshape(n, h, m, d // m)
        w = None if fisher is None else fisher.float().to(x.device).reshape(n, h, m, d // m).sum(-1)  # (N, H, M)
        if self.head_codebooks:
            pts = pts.permute(1, 2, 0, 3).reshape(h * m, n, d // m)  # (H*M, N, d_m)
            w = None if w is None else w.permute(1, 2, 0).reshape(h * m, n)
        else:
            pts = pts.reshape(n * h, m, d // m).transpose(0, 1)  # (M, N*H, d_m)
            w = None if w is None else w.reshape(n * h, m).transpose(0, 1)
        books = fit_codebooks(pts, 1 << self.bits, w, self.kmeans_iters, self.seed, self.max_samples)
        if self.head_codebooks:
            books = books.reshape(h, m, 1 << self.bits, d // m)
        return books.half().float().contiguous()  # stored fp16, as charged

    # ---- encode / decode -----------------------------------------------------------------------
    def _encode(self, x: Tensor, codebook: Tensor) -> Encoded:
        x = as_float(x)
        b, h, t, d = x.shape
        m = self._subspaces(d)
        codebook = codebook.to(x.device)
        per_head = codebook.dim() == 4
        if codebook.shape[-3] != m or codebook.shape[-1] != d // m or (per_head and codebook.shape[0] != h):
            raise KvqError(f"pq codebook {tuple(codebook.shape)} does not fit vectors of {h} heads x {d} dims")
        if per_head:
            pts = x.reshape(b, h, t, m, d // m).permute(1, 3, 0, 2, 4).reshape(h * m, b * t, d // m)
            idx = nearest_centroids(pts, codebook.reshape(h * m, -1, d // m), code_dtype(self.bits))  # (H*M, B*T)
            codes = idx.reshape(h, m, b, t).permute(2, 0, 3, 1).contiguous()
        else:
            pts = x.reshape(b * h * t, m, d // m).transpose(0, 1)  # (M, B*H*T, d_m)
            idx = nearest_centroids(pts, codebook, code_dtype(self.bits))  # (M, B*H*T)
            codes = idx.transpose(0, 1).reshape(b, h, t, m).contiguous()
        return with_outliers({"codes": codes}, x, token_outlier_mask(x, outliers_per_side(self.outliers, h * d)))

    def _decode(self, enc: Encoded, codebook: Tensor) -> Tensor:
        codes = enc["codes"].long()  # (B, H, T, M)
        b, h, t, m = codes.shape
        codebook = codebook.to(codes.device).float()  # (M, K, d_m) or (H, M, K, d_m)
        subspace = torch.arange(m, device=codes.device)
        if codebook.dim() == 4:
            x = codebook[torch.arange(h, device=codes.device).view(1, h, 1, 1), subspace, codes]
        else:
            x = codebook[subspace, codes]  # (B, H, T, M, d_m)
        return restore_outliers(x.reshape(b, h, t, m * codebook.shape[-1]), enc)

    def encode_keys(self, k: Tensor, state: State) -> Encoded:
        if self.rope_pairs:
            k = k[..., rope_pair_order(k.shape[-1], k.device)]
        return self._encode(k, state["key_codebook"])

    def decode_keys(self, enc: Encoded, state: State) -> Tensor:
        k = self._decode(enc, state["key_codebook"])
        if self.rope_pairs:
            k = k[..., rope_pair_order(k.shape[-1], k.device).argsort()]
        return k

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
        if "outlier_mask" in enc:  # sparse outliers replace entries: score the decoded keys
            k = self.decode_keys(enc, state).repeat_interleave(hq // max(h, 1), dim=1)
            return as_float(q) @ k.transpose(-1, -2)
        if bq != b or hq % h:
            raise KvqError(f"queries {tuple(q.shape)} do not match key codes {tuple(codes.shape)}")
        q = as_float(q)
        if self.rope_pairs:
            q = q[..., rope_pair_order(d, q.device)]  # q . k is the same in the permuted channel order
        codebook = state["key_codebook"].to(q.device).float()  # (M, K, d_m) or (H, M, K, d_m)
        if codebook.dim() == 4:  # per-head codebooks: query head i reads its KV head's
            book = codebook.repeat_interleave(hq // h, dim=0)  # (Hq, M, K, d_m)
            table = torch.einsum("bhtmd,hmkd->bhtmk", q.reshape(b, hq, tq, m, d // m), book)
        else:
            table = torch.einsum("bhtmd,mkd->bhtmk", q.reshape(b, hq, tq, m, d // m), codebook)
        codes = codes.repeat_interleave(hq // h, dim=1)  # (B, Hq, Tk, M)
        scores = torch.zeros(b, hq, tq, tk, device=q.device)
        for j in range(m):
            idx = codes[:, :, None, :, j].expand(b, hq, tq, tk)
            scores += table[:, :, :, j].gather(-1, idx)  # (B, Hq, Tq, Tk)
        return scores

    def state_shapes(self, kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
        m = self._subspaces(head_dim)
        shape = (m, 1 << self.bits, head_dim // m)
        shape = (kv_heads, *shape) if self.head_codebooks else shape
        return {"key_codebook": shape, "value_codebook": shape}

    # ---- bit accounting ------------------------------------------------------------------------
    def encoded_bits(self, enc: Encoded) -> int:
        """``nbits`` per subspace code, 32 per sparse outlier."""
        return packed_bits(enc, self.bits)

    def bits_per_token(self, kv_heads: int, head_dim: int) -> float:
        token_outliers = 2 * outliers_per_side(self.outliers, kv_heads * head_dim) * OUTLIER_BITS
        return float(2 * (kv_heads * self._subspaces(head_dim) * self.bits + token_outliers))

    def state_bits_estimate(self, kv_heads: int, head_dim: int) -> int:
        """Two codebooks ``(M, 2^nbits, D / M)`` in fp16 (``head_codebooks``: ``(H, M, 2^nbits, D / M)``)."""
        return FP16_BITS * 2 * (1 << self.bits) * head_dim * (kv_heads if self.head_codebooks else 1)


def rope_pair_order(head_dim: int, device=None) -> Tensor:
    """Channel order putting each RoPE ``rotate_half`` pair side by side: ``[0, D/2, 1, D/2 + 1, ...]``.

    ``x[..., order]`` permutes; ``y[..., order.argsort()]`` undoes it. An odd head_dim is left as it is.
    """
    if head_dim % 2:
        return torch.arange(head_dim, device=device)
    half = torch.arange(head_dim // 2, device=device)
    return torch.stack([half, half + head_dim // 2], -1).flatten()
