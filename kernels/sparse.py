"""Sparse outliers stored per ``(batch, head)`` row in token order: the layout the runtime keeps and the kvquant
decode kernel reads (no fixed slots: any number of outliers per token and head).

A stream of ``(B, H, T, D)`` entries with a boolean outlier mask is held as (``CAP`` entries per row, ``NP``
block pointers per row)::

    val  float16 (B, H, CAP)  the outliers' values; row (b, h) ordered by token, then channel (CAP grows by 1/4)
    idx  int16   (B, H, CAP)  (t % block) * D + d   (t: token index in the stream; block * D <= 32768)
    ptr  int32   (B, H, NP)   ptr[b, h, k] = entries of row (b, h) with t < k * block, for k <= cdiv(n, block)

So the entries of tokens ``[k * block, (k + 1) * block)`` are ``[ptr[k], ptr[k + 1])`` of their row: a decode
program that walks its tokens in blocks finds its outliers without reading anyone else's. Storage: 32 bits per
outlier plus 32 bits per row and ``block`` tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import cdiv

#: tokens per pointer (the decode kernels' token blocks must divide it)
SPARSE_BLOCK = 64


def sparse_block(head_dim: int) -> int:
    """Tokens per row pointer for ``head_dim`` channels: ``SPARSE_BLOCK``, fewer where ``head_dim > 512`` so that
    ``(t % block) * D + d`` fits 16 bits."""
    return min(SPARSE_BLOCK, (1 << 15) // head_dim)


class SparseRows:
    """Per-row sparse outliers of a growing ``(B, H, n, D)`` stream (module docstring for the layout)."""

    def __init__(self, batch: int, heads: int, head_dim: int, device=None, block: int = SPARSE_BLOCK,
                 capacity: int = 16):
        if block * head_dim > 1 << 15:
            raise ValueError(f"block {block} x head_dim {head_dim} does not fit 16-bit outlier indices")
        self.block, self.head_dim, self.n = block, head_dim, 0
        self.bound = 0  # an upper bound on the entries of any row (``reserve``)
        self.val = torch.zeros(batch, heads, capacity, dtype=torch.float16, device=device)
        self.idx = torch.zeros(batch, heads, capacity, dtype=torch.int16, device=device)
        self.ptr = torch.zeros(batch, heads, 16, dtype=torch.int32, device=device)

    @classmethod
    def from_dense(cls, mask: Tensor, values: Tensor, block: int = SPARSE_BLOCK) -> SparseRows:
        """The outliers ``values[mask]`` of ``(B, H, T, D)`` tokens ``[0, T)``."""
        b, h, _, d = mask.shape
        rows = cls(b, h, d, mask.device, block)
        rows.append(mask, values)
        return rows

    def counts(self) -> Tensor:
        """``(B, H)`` int32: entries per row."""
        return self.ptr[..., cdiv(self.n, self.block)]

    def _grow(self, entries: int, pointers: int) -> None:
        if entries > self.val.shape[-1]:  # grow by a quarter: slack is memory a long context cannot spare
            cap = max(entries, self.val.shape[-1] * 5 // 4 + 16)
            for name in ("val", "idx"):
                old = getattr(self, name)
                new = old.new_zeros(*old.shape[:2], cap)
                new[..., : old.shape[-1]] = old
                setattr(self, name, new)
        if pointers > self.ptr.shape[-1]:
            new = self.ptr.new_zeros(*self.ptr.shape[:2], max(pointers, 2 * self.ptr.shape[-1]))
            new[..., : self.ptr.shape[-1]] = self.ptr
            self.ptr = new

    def append(self, mask: Tensor, values: Tensor) -> None:
        """Add tokens ``[n, n + T)``: ``mask`` bool and ``values`` ``(B, H, T, D)`` (values read where masked)."""
        b, h, t, d = mask.shape
        n0, n1, blk = self.n, self.n + t, self.block
        before = self.counts().long()  # (B, H)
        cum = torch.nn.functional.pad(mask.sum(-1).cumsum(-1), (1, 0))  # (B, H, T + 1): new entries before t
        self.bound = max(self.bound, int((before + cum[..., -1]).max()) if t else 0)
        self._grow(self.bound, cdiv(n1, blk) + 1)
        nz = mask.nonzero()  # (N, 4) in (b, h, t, d) order, as values[mask]
        if nz.shape[0]:
            row = nz[:, 0] * h + nz[:, 1]
            per_row = cum[..., -1].flatten()
            start = per_row.cumsum(0) - per_row  # first entry of each row among the new ones
            dest = before.flatten()[row] + torch.arange(nz.shape[0], device=nz.device) - start[row]
            self.val[nz[:, 0], nz[:, 1], dest] = values[mask].to(torch.float16)
            self.idx[nz[:, 0], nz[:, 1], dest] = (((n0 + nz[:, 2]) % blk) * d + nz[:, 3]).to(torch.int16)
        self._advance(before, cum)

    def reserve(self, t: int, per_token: int) -> None:
        """Room for ``t`` more tokens of at most ``per_token`` entries per row each, for a writer on the device
        (``kvq_kernels.append``) that then calls ``advance(t)``. The true counts are read back (one host
        sync) only when the running upper bound would pass the capacity; growth then leaves room for at
        least a block of tokens more."""
        self._grow(0, cdiv(self.n + t, self.block) + 1)
        need = self.bound + t * per_token
        if need > self.val.shape[-1]:
            need = int(self.counts().max()) + t * per_token
            if need > self.val.shape[-1]:  # reallocate only when the true counts do not fit (a graph-captured
                self._grow(need + self.block * per_token, 0)  # writer must then be captured again)
        self.bound = need

    def cover(self, tokens: int) -> None:
        """Pointer arrays long enough for ``tokens`` tokens (a graph-captured reader's programs span the capacity)."""
        self._grow(0, cdiv(tokens, self.block) + 2)

    def advance(self, t: int) -> None:
        """Count ``t`` tokens whose entries and pointers a device writer has stored (after ``reserve``)."""
        self.n += t

    def skip(self, t: int) -> None:
        """Add ``t`` tokens without outliers."""
        before = self.counts().long()
        self._grow(0, cdiv(self.n + t, self.block) + 1)
        self._advance(before, before.new_zeros(*before.shape, t + 1))

    def _advance(self, before: Tensor, cum: Tensor) -> None:
        """Pointers for ``T = cum.shape[-1] - 1`` new tokens: ``before (B, H)`` entries before them, ``cum (B, H,
        T + 1)`` new entries before each of them."""
        t = cum.shape[-1] - 1
        n0, n1, blk = self.n, self.n + t, self.block
        k = torch.arange(n0 // blk + 1, cdiv(n1, blk) + 1, device=cum.device)  # pointers that change
        local = (k * blk - n0).clamp(0, t)
        self.ptr[..., k] = (before[..., None] + cum[..., local]).to(torch.int32)
        self.n = n1

    def entries(self, a: int = 0, b: int | None = None) -> tuple[Tensor, Tensor]:
        """The outliers of tokens ``[a, b)``: int64 flat indices into a contiguous ``(B, H, b - a, D)`` tensor and
        their fp16 values ``(N,)``. Work proportional to the outliers, not to ``(b - a) * D``.

        Rows are padded to the longest one by repeating their last entry (the same value to the same place), so
        a block-aligned read needs no mask; an index may therefore appear more than once (write, never add)."""
        b = self.n if b is None else b
        bs, hs = self.val.shape[:2]
        d, blk = self.head_dim, self.block
        lo, hi = self.ptr[..., a // blk].long(), self.ptr[..., cdiv(b, blk)].long()  # (B, H)
        span = hi - lo
        width = int(span.max()) if b > a else 0
        if width == 0:
            return torch.zeros(0, dtype=torch.int64, device=self.val.device), self.val.new_zeros(0)
        e = lo[..., None] + torch.arange(width, device=lo.device)  # (B, H, E)
        aligned = a % blk == 0 and (b % blk == 0 or b == self.n)  # whole pointer blocks: every entry is in [a, b)
        ok = None
        if aligned and int(span.min()) > 0:
            e = torch.minimum(e, hi[..., None] - 1)
        else:
            ok = e < hi[..., None]
            e = e.clamp(max=self.val.shape[-1] - 1)
        ptrs = self.ptr[..., : cdiv(self.n, blk) + 1].contiguous()
        block = torch.searchsorted(ptrs, e.to(torch.int32).contiguous(), right=True) - 1  # (B, H, E)
        ix = self.idx.gather(-1, e).long()
        tok = block * blk + ix // d  # token of each entry
        row = torch.arange(bs * hs, device=lo.device).view(bs, hs, 1)  # (B, H, 1): b * H + h
        flat = (row * (b - a) + tok - a) * d + ix % d  # (B, H, E)
        vals = self.val.gather(-1, e)
        if ok is None:
            return flat.view(-1), vals.view(-1)
        ok &= (tok >= a) & (tok < b)
        return flat[ok], vals[ok]

    def dense(self, a: int = 0, b: int | None = None) -> tuple[Tensor, Tensor]:
        """Tokens ``[a, b)`` as a bool mask and fp16 values ``(B, H, b - a, D)`` (0 where not an outlier)."""
        b = self.n if b is None else b
        bs, hs = self.val.shape[:2]
        shape = (bs, hs, max(b - a, 0), self.head_dim)
        mask = torch.zeros(shape, dtype=torch.bool, device=self.val.device)
        vals = torch.zeros(shape, dtype=torch.float16, device=self.val.device)
        flat, v = self.entries(a, b)
        mask.view(-1)[flat] = True
        vals.view(-1)[flat] = v
        return mask, vals

    def nbytes(self, allocated: bool = False) -> int:
        """Bytes held: 4 per outlier and per row pointer (``allocated``: the buffers' full size)."""
        if allocated:
            return sum(x.numel() * x.element_size() for x in (self.val, self.idx, self.ptr))
        rows = self.val.shape[0] * self.val.shape[1]
        return 4 * int(self.counts().sum()) + 4 * rows * (cdiv(self.n, self.block) + 1)
