"""The Triton quantize-and-append (``kvq_kernels.append``) as a stream's ``fused`` writer, where it stores exactly
what the method's own encode would: kvquant with one codebook per layer (not ``head_codebooks``), keys per
channel or per (token, head) vector, values per (token, head) vector (not ``token_scales``), 1-4 bits.

One launch per stream and decode step, no host sync (``SparseRows.reserve`` reads the counts back once in a
while), against the encode, bit packing and ``SparseRows.append`` of the PyTorch path (hundreds of launches
and a sync per step). ``tests/test_append.py`` checks that both leave the same bytes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..methods.base import KVMethod, State
from ..methods.quant_ops import outliers_per_side
from .storage import PackedStore


class FusedAppend:
    """``fused(store, x, state)`` for one kvquant stream: ``x (B, H, T, D)`` leaving tokens."""

    def __init__(self, method: KVMethod, is_key: bool):
        self.method, self.per_channel = method, is_key and method.per_channel
        self.bits = method.stream_bits(is_key)  # this stream's code width (kvquant's values may have their own)
        self.codebook = "key_codebook" if is_key else "value_codebook"
        self._mids: tuple[Tensor, Tensor] | None = None

    @staticmethod
    def applies(method: KVMethod, is_key: bool) -> bool:
        """Whether the kernel represents ``method``'s encoding of this stream exactly."""
        if method.name != "kvquant" or method.head_codebooks or not 1 <= method.stream_bits(is_key) <= 4:
            return False
        return (is_key and method.per_channel) or not method.token_scales

    def mids(self, state: State) -> Tensor:
        """Midpoints ``(2^bits - 1,)`` float32 of the stream's codebook, made once per state tensor."""
        from kvq_kernels.reference import codebook_midpoints

        cb = state[self.codebook]
        if self._mids is None or self._mids[0] is not cb:
            self._mids = (cb, codebook_midpoints(cb).contiguous())
        return self._mids[1]

    def per_token(self, d: int, heads: int) -> int:
        """Outlier entries one token may add to a row: every channel (keys), the top and bottom (values)."""
        return d if self.per_channel else min(2 * outliers_per_side(self.method.outliers, heads * d), d)

    def reserve(self, store: PackedStore) -> None:
        """Before a graph step: room for one more token's outliers (host bookkeeping, an occasional sync), pointer
        arrays covering the capacity (the decode programs span it)."""
        rows = store.outliers
        if rows is not None:
            rows.cover(store.capacity)
            rows.reserve(1, self.per_token(rows.head_dim, rows.val.shape[1]))

    def at_device(self, store: PackedStore, x: Tensor, state: State, at: Tensor) -> None:
        """The graph-step twin of ``__call__``: the token ``x (B, H, 1, D)`` at the device's index ``at`` (int64
        ``(1,)``) into buffers that exist at their fixed capacity (room reserved by ``reserve``); the host's counts
        move afterwards (``PackedStore.advance``)."""
        from kvq_kernels.append import append_kvquant

        m, f = self.method, store.fields
        n_out = 0 if self.per_channel else outliers_per_side(m.outliers, x.shape[1] * x.shape[3])
        extra = (dict(lo=state["key_lo"], hi=state["key_hi"]) if self.per_channel else
                 dict(scale=f["scale"].buf, zero=f["zero"].buf, n_out=n_out))
        rows = store.outliers if m.outliers > 0 else None
        append_kvquant(x, f["codes"].buf, store.n, self.mids(state), self.bits, rows=rows, at=at, **extra)

    def __call__(self, store: PackedStore, x: Tensor, state: State) -> None:
        from kvq_kernels.append import append_kvquant
        from kvq_kernels.reference import packed_bytes

        b, h, t, d = x.shape
        m = self.method
        fields = {"codes": (packed_bytes(d, self.bits), torch.uint8)}
        if not self.per_channel:
            fields |= {"scale": (1, torch.float16), "zero": (1, torch.float16)}
        n = store.n
        bufs = store.claim(x, t, fields)
        n_out = 0 if self.per_channel else outliers_per_side(m.outliers, h * d)
        keeps = m.outliers > 0
        rows = store.outlier_rows(b, h, d, x.device) if keeps else None
        if rows is not None:
            rows.reserve(t, self.per_token(d, h))
        extra = (dict(lo=state["key_lo"], hi=state["key_hi"]) if self.per_channel else
                 dict(scale=bufs["scale"], zero=bufs["zero"], n_out=n_out))
        append_kvquant(x, bufs["codes"], n, self.mids(state), self.bits, rows=rows, **extra)
        if rows is not None:
            rows.advance(t)
        store.n += t
