"""Triton reading of the ``cq`` / ``pq`` bit-stream code rows (layout: ``kvq_kernels.vq_reference``).

Code j of a row sits at bit ``j * BITS``: it spans at most ``SPAN`` bytes, ``SPAN = ceil((8 - gcd(BITS, 8) +
BITS) / 8)`` (the largest bit offset inside a byte is ``8 - gcd``): 1 byte for 1/2/4/8-bit codes, 2 for
most widths, 3 for 11 bits. ``_load_vq_codes`` gathers those bytes, ORs them and shifts/masks; 8-bit codes
are one contiguous byte load.

Public function (the kernels use the jit helper directly; this one is for tests):
    unpack_vq_codes(packed, bits, n) -> int16 codes ``(..., n)`` from ``uint8 (..., ceil(n*bits/8))``
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import cdiv, next_pow2
from .vq_reference import row_bytes


def code_span(bits: int) -> int:
    """Bytes a ``bits``-bit code of a bit-stream row can span."""
    return -(-(8 - math.gcd(bits, 8) + bits) // 8)


@triton.jit
def _load_vq_codes(row_ptr, rmask, FIRST: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr, SPAN: tl.constexpr,
                   NB: tl.constexpr, R: tl.constexpr):
    """Codes ``[FIRST, FIRST + N)`` of ``R`` rows (``row_ptr (R,)`` uint8 pointers, ``rmask (R,)``) -> int32 (R, N)."""
    j = FIRST + tl.arange(0, N)
    if BITS == 8:
        return tl.load(row_ptr[:, None] + j[None, :], mask=rmask[:, None], other=0).to(tl.int32)
    bit = j * BITS
    byte = bit // 8
    val = tl.load(row_ptr[:, None] + byte[None, :], mask=rmask[:, None] & (byte < NB)[None, :], other=0).to(tl.int32)
    for s in tl.static_range(1, SPAN):
        more = rmask[:, None] & (byte + s < NB)[None, :]
        val |= tl.load(row_ptr[:, None] + (byte + s)[None, :], mask=more, other=0).to(tl.int32) << (8 * s)
    return (val >> (bit % 8)[None, :]) & ((1 << BITS) - 1)


@triton.jit
def _unpack_kernel(P, C, n_rows, N: tl.constexpr, NP: tl.constexpr, BITS: tl.constexpr, SPAN: tl.constexpr,
                   NB: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < n_rows
    codes = _load_vq_codes(P + r.to(tl.int64) * NB, rmask, 0, NP, BITS, SPAN, NB, BLOCK_R)
    j = tl.arange(0, NP)
    tl.store(C + r.to(tl.int64)[:, None] * N + j[None, :], codes.to(tl.int16), mask=rmask[:, None] & (j < N)[None, :])


def unpack_vq_codes(packed: Tensor, bits: int, n: int, block_r: int = 16) -> Tensor:
    """Triton twin of ``vq_reference.unpack_vq_codes``: ``uint8 (..., ceil(n*bits/8))`` -> ``int16 (..., n)``."""
    nb = row_bytes(n, bits)
    if packed.shape[-1] != nb or not packed.is_contiguous():
        raise ValueError(f"packed must be contiguous (..., {nb}), got {tuple(packed.shape)}")
    out = torch.empty(*packed.shape[:-1], n, dtype=torch.int16, device=packed.device)
    rows = packed.numel() // nb
    _unpack_kernel[(cdiv(rows, block_r),)](packed, out, rows, N=n, NP=next_pow2(n), BITS=bits,
                                                  SPAN=code_span(bits), NB=nb, BLOCK_R=block_r)
    return out
