"""Bit-packed storage of one layer's keys or values (one *stream*): fp16 sink, packed history, fp16 residual.

A stream holds tokens in position order: ``[0, S)`` the fp16 sink, ``[S, S + n)`` the quantized history,
``[S + n, S + n + r)`` the fp16 residual window. New tokens go to the sink until it is full, then to the
residual; tokens leave the residual oldest first, ``step`` at a time (1 = token by token; KIVI keys: a whole
group), while it holds more than ``window`` tokens. Leaving tokens are encoded by the method itself
(``encode_keys`` / ``encode_values``) and the encoding is stored packed:

* ``codes`` uint8 one per element -> ``pack_codes`` at ``bits`` (1-4 bits: ``D * bits / 8`` bytes per
  token-head); 8-bit codes are kept as bytes; the fp16 method's ``data`` is kept as fp16.
* ``codes`` int16, one per vector-quantized group (cq: ``D / c`` per token-head, pq: ``M``) ->
  ``pack_vq_codes``: one LSB-first bit stream of ``ceil(n * bits / 8)`` bytes per token-head (any width 1..12;
  no padding when ``n * bits`` is a multiple of 8; 8-bit codes are plain bytes).
* ``scale`` / ``zero`` fp16 as the method returns them: per token ``(B, H, T, g)`` or, with ``step > 1``,
  per group of ``step`` tokens ``(B, H, T / step, g)``.
* ``outlier_mask`` + ``outlier_values`` -> ``kvq_kernels.sparse.SparseRows``: per (batch, head) row, in token
  order, an fp16 value and an int16 position each, plus an int32 pointer per row and 64 tokens (the layout the
  kvquant decode kernel reads). Every outlier the method marks is kept (no fixed slots, so decoding equals the
  method's). Value outliers are exactly ``2n`` per token, as the accounting charges; key outliers are the entries
  beyond the calibrated thresholds, as many as the data has, while ``accounting.cache_bits`` charges the
  nominal fraction: the two agree when the data's rate is the calibrated one, and ``nbytes`` always reports the
  truth (``tests/test_runtime.py`` reconciles the difference exactly).

``read(a, b)`` hands a block back to the method's ``decode_*`` (so stored and simulated numbers agree), its outliers
in the sparse form ``outlier_index`` / ``outlier_values`` (``quant_ops.restore_outliers``), so a decode step costs
no dense mask.
"""

from __future__ import annotations

import torch
from kvq_kernels.reference import next_pow2
from kvq_kernels.sparse import SparseRows, sparse_block
from torch import Tensor

from ..errors import KvqError
from ..methods.base import Encoded, KVMethod, State

#: leaving tokens a fused writer takes at once (it walks them one by one); more go through ``encode``
FUSED_TOKENS = 16


class Grow:
    """A tensor growing along dim 2 (``(B, H, n, ...)``): a fixed capacity, or a power of two >= 16 that
    doubles (so buffers holding as many entries have the same capacity, as the Triton path needs)."""

    def __init__(self, like: Tensor, capacity: int | None = None):
        self.fixed = capacity is not None
        cap = capacity if capacity is not None else _pow2(like.shape[2])
        self.buf = like.new_zeros(*like.shape[:2], cap, *like.shape[3:])
        self.n = 0

    def reserve(self, t: int) -> Tensor:
        """Room for ``t`` more entries (counted at once): the view ``(B, H, t, ...)`` the caller fills."""
        need = self.n + t
        if need > self.buf.shape[2]:
            if self.fixed:
                raise KvqError(f"the cache is full ({self.buf.shape[2]} tokens): load it with a larger max_tokens")
            self.ensure(need)
        self.n = need
        return self.buf[:, :, need - t : need]

    def ensure(self, entries: int) -> None:
        """A buffer of at least ``entries`` (a power of two >= 16 when it must grow), the filled part kept."""
        if entries > self.buf.shape[2]:
            bigger = self.buf.new_zeros(*self.buf.shape[:2], _pow2(entries), *self.buf.shape[3:])
            bigger[:, :, : self.n] = self.buf[:, :, : self.n]
            self.buf = bigger

    def append(self, x: Tensor) -> None:
        self.reserve(x.shape[2]).copy_(x)

    def view(self, a: int = 0, b: int | None = None) -> Tensor:
        return self.buf[:, :, a : self.n if b is None else b]

    def nbytes(self, allocated: bool = False) -> int:
        per = self.buf[:, :, :1].numel() * self.buf.element_size()
        return per * (self.buf.shape[2] if allocated else self.n)


def _pow2(n: int) -> int:
    return max(16, next_pow2(n))


def pow2_parts(head_dim: int) -> list[int]:
    """``head_dim`` as a sum of powers of two, largest first (96 -> [64, 32]): the groups a head whose size is not a
    power of two is packed in, each as ``kvq_kernels.reference.pack_codes`` packs a whole power-of-two head."""
    return [1 << i for i in reversed(range(head_dim.bit_length())) if head_dim >> i & 1]


def check_packing(head_dim: int, bits: int) -> None:
    """``ValueError`` unless every group of ``head_dim`` (``pow2_parts``) holds ``bits``-bit codes without waste."""
    from kvq_kernels.reference import check_head_dim

    for part in pow2_parts(head_dim):
        try:
            check_head_dim(part, bits)
        except ValueError:
            raise ValueError(f"head_dim {head_dim} cannot hold {bits}-bit codes without waste (its group of {part} "
                             "channels is too small)") from None


def pack_any(codes: Tensor, bits: int) -> Tensor:
    """``pack_codes`` of ``codes (..., D)`` for any ``D`` that ``check_packing`` takes: each power-of-two group packed
    on its own, the bytes side by side (``D * bits / 8`` in all: no padding)."""
    from kvq_kernels.reference import pack_codes

    parts, out, a = pow2_parts(codes.shape[-1]), [], 0
    if len(parts) == 1:
        return pack_codes(codes, bits)
    for p in parts:
        out.append(pack_codes(codes[..., a : a + p], bits))
        a += p
    return torch.cat(out, -1)


def unpack_any(packed: Tensor, bits: int, head_dim: int) -> Tensor:
    """Inverse of ``pack_any``: ``(..., D * bits / 8)`` bytes -> ``(..., D)`` codes."""
    from kvq_kernels.reference import unpack_codes

    parts, out, a = pow2_parts(head_dim), [], 0
    if len(parts) == 1:
        return unpack_codes(packed, bits, head_dim)
    for p in parts:
        width = p * bits // 8
        out.append(unpack_codes(packed[..., a : a + width], bits, p))
        a += width
    return torch.cat(out, -1)


def sparse_rows(batch: int, heads: int, head_dim: int, device) -> SparseRows:
    """An empty per-row outlier store for a ``(B, H, T, D)`` stream: pointers every 64 tokens (fewer where
    ``D > 512``, so ``(t % block) * D + d`` fits 16 bits)."""
    if head_dim > 1 << 15:
        raise KvqError(f"head_dim {head_dim} is too large for 16-bit outlier positions")
    return SparseRows(batch, heads, head_dim, device, block=sparse_block(head_dim))


class PackedStore:
    """The quantized history of one stream: packed codes, fp16 statistics, sparse outliers.

    ``step`` tokens share one set of group statistics (1: per token). ``capacity`` fixes the size.
    """

    def __init__(self, method: KVMethod, is_key: bool, step: int, capacity: int | None):
        self.method, self.is_key, self.step, self.capacity = method, is_key, step, capacity
        self.fields: dict[str, Grow] = {}
        self.outliers: SparseRows | None = None
        self.n = 0
        self.head_dim = 0  # codes per token-head row (D; cq: D / c, pq: M)
        self.vector = False  # int16 vector-quantization codes (cq, pq) rather than uint8 per-element codes

    def _per(self, name: str) -> int:
        """Tokens per row of field ``name``: 1 for codes and data, ``step`` for statistics."""
        return 1 if name in ("codes", "data") else self.step

    def _capacity(self, name: str) -> int | None:
        """A field's fixed capacity (tokens, or token groups of ``step`` for statistics), None: growing."""
        if self.capacity is None:
            return None
        return -(-self.capacity // self._per(name))

    def _pack(self, codes: Tensor) -> Tensor:
        bits = self.method.stream_bits(self.is_key)
        if self.vector:  # cq / pq: int16 codes (B, H, T, n) -> bit-stream rows (B, H, T, ceil(n * bits / 8))
            from kvq_kernels.vq_reference import pack_vq_codes

            return pack_vq_codes(codes, bits)
        if bits > 4:
            return codes  # 8-bit codes: one byte each already
        return pack_any(codes, bits)  # (B, H, T, D * bits / 8)

    def _unpack(self, packed: Tensor) -> Tensor:
        bits = self.method.stream_bits(self.is_key)
        if self.vector:
            from kvq_kernels.vq_reference import unpack_vq_codes

            return unpack_vq_codes(packed, bits, self.head_dim)  # (B, H, T, n) int16
        if bits > 4:
            return packed
        return unpack_any(packed, bits, self.head_dim)  # (B, H, T, D)

    def append(self, enc: Encoded) -> None:
        """Store the encoding of ``T`` new tokens (``T`` a multiple of ``step``)."""
        stored = {k: v for k, v in enc.items() if k not in ("outlier_mask", "outlier_values")}
        if "codes" in stored:
            self.head_dim = stored["codes"].shape[-1]
            self.vector = stored["codes"].dtype != torch.uint8
            stored["codes"] = self._pack(stored["codes"])
        unknown = set(stored) - {"codes", "data", "scale", "zero"}
        if unknown or not ({"codes", "data"} & set(stored)):
            raise KvqError(f"method {self.method.name}: the runtime cannot store encodings with {sorted(enc)}")
        t = next(iter(v for k, v in stored.items() if k in ("codes", "data"))).shape[2]
        for name, x in stored.items():
            if name not in self.fields:
                self.fields[name] = Grow(x, self._capacity(name))
            self.fields[name].append(x)
        if "outlier_mask" in enc:
            b, h, _, d = enc["outlier_mask"].shape
            self.outlier_rows(b, h, d, enc["outlier_mask"].device)
            self.outliers.append(enc["outlier_mask"], enc["outlier_values"])
        elif self.outliers is not None:
            self.outliers.skip(t)
        self.n += t

    def write_at(self, enc: Encoded, offset: Tensor) -> None:
        """The graph-step twin of ``append``: the encoding of ``T`` tokens (no outliers) written at the device's
        token ``offset`` (int64 ``(1,)``, a multiple of ``step``) into fields that already exist at a fixed
        capacity. Static shapes only, no host sync; the counts move in ``advance``."""
        stored = dict(enc)
        stored["codes"] = self._pack(stored["codes"])
        for name, x in stored.items():
            rows = offset // self._per(name) + torch.arange(x.shape[2], device=x.device)  # (T / per,)
            self.fields[name].buf.index_copy_(2, rows, x)

    def advance(self, t: int) -> None:
        """Count ``t`` tokens that a device writer stored (``write_at``, ``FusedAppend.at_device``; ``t`` a multiple
        of ``step``), outliers included."""
        for name, f in self.fields.items():
            f.n += t // self._per(name)
        if self.outliers is not None:
            self.outliers.advance(t)
        self.n += t

    def outlier_rows(self, batch: int, heads: int, head_dim: int, device) -> SparseRows:
        """The stream's outliers, made (aligned with the tokens already stored) when first needed."""
        if self.outliers is None:
            self.outliers = sparse_rows(batch, heads, head_dim, device)
            self.outliers.skip(self.n)  # keep token numbering aligned
        return self.outliers

    def claim(self, like: Tensor, t: int, fields: dict[str, tuple[int, torch.dtype]]) -> dict[str, Tensor]:
        """Room for ``t`` tokens of ``like (B, H, *, D)`` in ``fields`` (name -> last dim, dtype; made where
        absent), for a writer on the device (``fused``): their whole buffers, tokens ``[n, n + t)`` to fill.
        The caller advances ``n``."""
        b, h, _, d = like.shape
        for name, (width, dtype) in fields.items():
            if name not in self.fields:
                empty = torch.empty(b, h, 0, width, dtype=dtype, device=like.device)
                self.fields[name] = Grow(empty, self._capacity(name))
            self.fields[name].reserve(t)
        self.head_dim, self.vector = d, False
        return {name: self.fields[name].buf for name in fields}

    def read(self, a: int, b: int) -> Encoded:
        """The encoding of stored tokens ``[a, b)`` (``a`` a multiple of ``step``; ``b`` too unless it is ``n``)."""
        enc: Encoded = {}
        for name, f in self.fields.items():
            per = self._per(name)
            enc[name] = f.view(a // per, -(-b // per))
        if "codes" in enc:
            enc["codes"] = self._unpack(enc["codes"])
        if self.outliers is not None:  # sparse: flat positions in (B, H, b - a, D) and their values
            enc["outlier_index"], enc["outlier_values"] = self.outliers.entries(a, b)
        return enc

    def decode(self, a: int, b: int, state: State) -> Tensor:
        """Dequantized tokens ``[a, b)``: float32 ``(B, H, b - a, D)``, by the method's own decode."""
        enc = self.read(a, b)
        return (self.method.decode_keys if self.is_key else self.method.decode_values)(enc, state)

    def nbytes(self, allocated: bool = False) -> int:
        total = sum(f.nbytes(allocated) for f in self.fields.values())
        return total + (self.outliers.nbytes(allocated) if self.outliers is not None else 0)


class Stream:
    """One layer's keys or values: fp16 sink ``(B, H, S, D)``, packed history, fp16 residual ``(B, H, r, D)``.

    ``window``: residual tokens kept in fp16 (the method's ``residual``); ``step``: tokens quantized
    together when they leave it (KIVI: ``group``, keys and values alike, as KIVI's own implementation flushes
    them together; else 1); ``stats_step``: tokens sharing one set of statistics (default ``step``; KIVI
    values: 1, per token). KIVI's windows therefore hold between ``window - group + 1`` and ``window``
    tokens (fewer than ``group`` when ``window < group``); the accounting charges ``window``, which is exact
    when ``tokens - sink - window`` is a multiple of ``group``.
    """

    def __init__(self, method: KVMethod, is_key: bool, sink: int, window: int, step: int, capacity: int | None,
                 stats_step: int | None = None):
        self.sink_size, self.window, self.step = sink, window, step
        self.packed = PackedStore(method, is_key, step if stats_step is None else stats_step, capacity)
        self.capacity = capacity
        self.sink: Grow | None = None
        self.residual: Grow | None = None

    def __len__(self) -> int:
        return (self.sink.n if self.sink else 0) + self.packed.n + (self.residual.n if self.residual else 0)

    def append(self, x: Tensor, state: State, encode, fused=None) -> Encoded | None:
        """Append ``x (B, H, T, D)``; tokens leaving the residual window are encoded by ``encode(x, state)``,
        or, at most ``FUSED_TOKENS`` at a time, stored by ``fused(packed, x, state)`` (``runtime.fused``).
        Returns the encoding stored by ``encode`` (the last ``T'`` packed tokens), None when none was."""
        if self.capacity is not None and len(self) + x.shape[2] > self.capacity:
            raise KvqError(f"the cache is full ({self.capacity} tokens): load it with a larger max_tokens")
        if self.sink is None:
            empty = x.new_empty(*x.shape[:2], 0, x.shape[3], dtype=torch.float16)
            self.sink, self.residual = Grow(empty, self.sink_size), Grow(empty)
        take = min(self.sink_size - self.sink.n, x.shape[2])
        if take > 0:
            self.sink.append(x[:, :, :take])  # (copied as fp16)
        rest = x[:, :, take:]
        r = self.residual.n + rest.shape[2]
        over = r - self.window
        if over <= 0:
            leave = 0
        elif self.step == 1:
            leave = over
        else:  # KIVI keys: whole groups, as few as bring the window back under its size
            leave = min(-(-over // self.step), r // self.step) * self.step
        if leave == 0:
            if rest.shape[2]:
                self.residual.append(rest)
            return None
        # leaving: the oldest ``leave`` of residual + new tokens (new ones quantized from full precision,
        # those that waited in the window from their fp16 copy)
        seq = torch.cat([self.residual.view().to(x.dtype), rest], 2) if self.residual.n else rest  # (B, H, r, D)
        enc = None
        if fused is not None and leave <= FUSED_TOKENS:
            fused(self.packed, seq[:, :, :leave], state)
        else:
            enc = encode(seq[:, :, :leave], state)
            self.packed.append(enc)
        self.residual.n = 0
        if seq.shape[2] > leave:
            self.residual.append(seq[:, :, leave:])
        return enc

    def graph_flush(self, x: Tensor, state: State, encode, offset: Tensor) -> None:
        """The graph-step twin of ``append`` when the residual window is full: ``x (B, H, 1, D)`` joins it and the
        oldest ``step`` tokens leave, encoded, into the packed store at the device's token ``offset`` (shapes are
        all static). The host moves the counts afterwards (``packed.advance``, ``residual.n``)."""
        w, res = self.window, self.residual.buf
        seq = torch.cat([res[:, :, :w].to(x.dtype), x], 2)  # (B, H, w + 1, D), as ``append`` builds it
        self.packed.write_at(encode(seq[:, :, : self.step], state), offset)
        res[:, :, : w + 1 - self.step].copy_(seq[:, :, self.step :])

    def read(self, a: int, b: int, state: State) -> Tensor:
        """Tokens ``[a, b)`` as float32 ``(B, H, b - a, D)``, dequantizing only the packed part inside."""
        s, n = self.sink.n, self.packed.n
        parts = []
        if a < s:
            parts.append(self.sink.view(a, min(b, s)).float())
        if b > s and a < s + n:
            parts.append(self.packed.decode(max(a, s) - s, min(b, s + n) - s, state))
        if b > s + n:
            parts.append(self.residual.view(max(a, s + n) - s - n, b - s - n).float())
        return parts[0] if len(parts) == 1 else torch.cat(parts, 2)

    def nbytes(self, allocated: bool = False) -> int:
        fp = sum(g.nbytes(allocated) for g in (self.sink, self.residual) if g is not None)
        return fp + self.packed.nbytes(allocated)
