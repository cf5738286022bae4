"""``DecodedMirror``: the CPU reference path's float32 copy of a layer's sink and packed history, decoded once.

A packed token never changes once stored (streams are append-only; ``reset`` makes new ones), so the CPU reference
decode need not dequantize the whole history every step: the mirror keeps keys (post-RoPE) and values of positions
``[0, n)`` (sink and packed history, never the fp16 residual window, whose tokens move on) as the reference path
computes them, and decodes only the tokens appended since (``extend``). A decode step then reads its block as a view.

It is a compute cache, not part of the stored cache: ``nbytes`` / ``avg_bits`` describe the packed store alone and
never count it; ``KVQCache.mirror_nbytes`` does. Its size is bounded: at most ``limit`` tokens per layer (a share
of ``MIRROR_BUDGET`` bytes per cache, ``load_cache(mirror_budget=...)``); positions beyond are decoded per read,
as before. Used only on the CPU, by the PyTorch reference path (``KVQLayer.read``); the Triton paths read the
packed store.
"""

from __future__ import annotations

from torch import Tensor

from ..methods.base import Encoded
from .attention import block_bounds

#: Bytes of decoded float32 K/V a CPU cache keeps at most, over all its layers (SmolLM2-135M: 46 KiB per token,
#: so about 5,800 tokens; the float32 DynamicCache of the 16-bit baseline holds as much per token).
MIRROR_BUDGET = 256 << 20


class DecodedMirror:
    """Decoded float32 keys (post-RoPE) and values ``(B, H, n, D)`` of positions ``[0, n)``, ``n <= limit``."""

    def __init__(self, limit: int, capacity: int | None = None):
        self.limit = limit if capacity is None else min(limit, capacity)
        self.k: Tensor | None = None  # (B, H, allocated, D) float32
        self.v: Tensor | None = None
        self.n = 0
        self._streams: tuple | None = None  # the (keys, values) streams the mirror was decoded from

    def stable(self, layer) -> int:
        """Positions of ``layer`` that never change again: its sink and packed history (both streams)."""
        ks, vs = layer.keys_stream, layer.values_stream
        if ks.sink is None:
            return 0
        return min(len(s) - s.residual.n for s in (ks, vs))

    def extend(self, layer, fresh: tuple[Encoded | None, Encoded | None] | None = None) -> None:
        """Decode the positions appended since the last call (up to ``limit``); start over when the layer's streams
        were replaced (``reset``). ``fresh``: the key and value encodings the streams just stored (``Stream.append``):
        when they are exactly the new positions, they are decoded as they are (what the store would give back, bit
        for bit, without unpacking); otherwise the new positions are read back through ``layer.decode``."""
        streams = (layer.keys_stream, layer.values_stream)
        stable = self.stable(layer)
        if self._streams is None or any(a is not b for a, b in zip(self._streams, streams, strict=True)) or \
                stable < self.n:
            self.k = self.v = None
            self.n, self._streams = 0, streams
        sink = layer.keys_stream.sink.n if stable else 0
        end = min(stable, self.limit)
        if end < stable and end > sink:  # cut by the limit: whole groups of ``step`` (the rest is read from there)
            end = sink + (end - sink) // layer.step * layer.step
        if end <= self.n:
            return
        t = end - self.n
        if fresh is not None and end == stable and t <= layer.block and all(
                e is not None and _tokens(e) == t for e in fresh):
            method, state = layer.method, layer.state()
            k = method.decode_keys(fresh[0], state)  # (B, H, t, D)
            if method.keys_pre_rope:
                k = layer.rope.apply_range(k, self.n)
            self._put(k, method.decode_values(fresh[1], state))
            return
        for a, e in block_bounds(end, sink, layer.block):  # read back a block at a time (no larger float transient)
            if e > self.n:
                self._put(*layer.decode(max(a, self.n), e))

    def _put(self, k: Tensor, v: Tensor) -> None:
        """Append decoded keys and values ``(B, H, t, D)`` at position ``n``."""
        end = self.n + k.shape[2]
        if self.k is None or end > self.k.shape[2]:
            self._grow(k, end)
        self.k[:, :, self.n : end] = k
        self.v[:, :, self.n : end] = v
        self.n = end

    def _grow(self, like: Tensor, end: int) -> None:
        """Buffers of at least ``end`` positions (doubling, at most ``limit``), the decoded part kept."""
        cap = min(self.limit, max(end, 2 * (0 if self.k is None else self.k.shape[2])))
        b, h, _, d = like.shape
        k, v = like.new_empty(b, h, cap, d), like.new_empty(b, h, cap, d)
        if self.k is not None:
            k[:, :, : self.n], v[:, :, : self.n] = self.k[:, :, : self.n], self.v[:, :, : self.n]
        self.k, self.v = k, v

    def read(self, a: int, b: int) -> tuple[Tensor, Tensor]:
        """Views of positions ``[a, b)`` (``b <= n``)."""
        return self.k[:, :, a:b], self.v[:, :, a:b]

    def nbytes(self) -> int:
        """Bytes held (allocated)."""
        return sum(t.numel() * t.element_size() for t in (self.k, self.v) if t is not None)


def mirror_tokens(budget: int, layers: int, batch: int, kv_heads: int, head_dim: int) -> int:
    """Tokens per layer that ``budget`` bytes of float32 K and V hold, shared by ``layers`` layers."""
    return budget // max(1, layers * 2 * batch * kv_heads * head_dim * 4)


def _tokens(enc: Encoded) -> int:
    """Tokens in an encoding (its ``codes`` or ``data``, ``(B, H, T, ...)``)."""
    return next(v for name, v in enc.items() if name in ("codes", "data")).shape[2]
