"""``turbo``: TurboQuant's MSE variant (arXiv 2504.19874), calibration-free: rotate, Lloyd-Max, fp16 norm.

Each head vector ``x`` (post-RoPE keys and values alike) of ``D`` entries is rotated by a fixed random-sign
Hadamard matrix ``Q = H_D diag(s) / sqrt(D)`` (``s`` random signs drawn from ``seed``: the same ``Q`` for every
layer and head, on every run), so each rotated coordinate is close to ``N(0, |x|^2 / D)``. The coordinates, scaled
by ``sqrt(D) / |x|``, are quantized with the Lloyd-Max codebook of the standard normal at ``bits`` bits
(``lloyd_max_normal``); ``|x|`` is kept in fp16. Decoding inverts it: ``x ~ Q^T (levels[codes] * |x| / sqrt(D))``.
``D`` must be a power of two (the Hadamard matrix); other head sizes are refused.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import KvqError
from ..lazy import torch
from .base import FP16_BITS, Encoded, KVMethod, State, as_float
from .quant_ops import nearest_code, packed_bits
from .registry import register

if TYPE_CHECKING:
    from torch import Tensor

#: Largest fp16 value: a norm beyond it is stored saturated.
_FP16_MAX = 65504.0


@functools.lru_cache(maxsize=8)
def lloyd_max_normal(bits: int, iters: int = 2000) -> Tensor:
    """The ``(2^bits,)`` sorted float32 Lloyd-Max levels of the standard normal (the MSE-optimal scalar quantizer),
    by Lloyd's iteration on the exact density: each threshold the midpoint of its neighbours, each level the
    conditional mean ``(phi(a) - phi(b)) / (Phi(b) - Phi(a))`` of its interval."""
    k = 1 << bits
    p = (torch.arange(k, dtype=torch.float64) + 0.5) / k
    c = math.sqrt(2) * torch.erfinv(2 * p - 1)  # the normal's quantiles: a start close to the optimum
    inf = torch.tensor([math.inf], dtype=torch.float64)
    for _ in range(iters):
        t = torch.cat([-inf, (c[1:] + c[:-1]) / 2, inf])  # (k + 1,) thresholds
        pdf = torch.exp(-t.square() / 2) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + torch.erf(t / math.sqrt(2)))
        new = (pdf[:-1] - pdf[1:]) / (cdf[1:] - cdf[:-1])
        if torch.allclose(new, c, rtol=0, atol=1e-12):
            c = new
            break
        c = new
    return c.float()


def is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@functools.lru_cache(maxsize=16)
def _rotation_cpu(head_dim: int, seed: int) -> Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < head_dim:  # Sylvester: H_2n = [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    signs = torch.randint(0, 2, (head_dim,), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
    return (h * signs[None, :] / math.sqrt(head_dim)).float()  # (D, D): H diag(s) / sqrt(D)


def check_head_dim(head_dim: int) -> None:
    """``KvqError`` unless ``head_dim`` is a power of two (the Hadamard rotation's size)."""
    if not is_pow2(head_dim):
        raise KvqError(f"turbo needs a head_dim that is a power of two (its Hadamard rotation), not {head_dim}")


def rotation(head_dim: int, seed: int, device=None) -> Tensor:
    """The orthogonal ``(D, D)`` float32 matrix ``Q = H_D diag(s) / sqrt(D)`` (rotate: ``x @ Q.T``; undo: ``y @ Q``).
    ``KvqError`` unless ``D`` is a power of two."""
    check_head_dim(head_dim)
    return _rotation_cpu(head_dim, seed).to(device)


@register
@dataclass
class TurboQuant(KVMethod):
    """TurboQuant-MSE. Encoding of ``x (B, H, T, D)``: ``codes`` uint8 ``(B, H, T, D)`` indexing
    ``lloyd_max_normal(bits)``, ``scale`` float16 ``(B, H, T, 1)`` (the vector's L2 norm)."""

    name = "turbo"
    supported_bits = (1, 2, 3, 4)

    bits: int = 3
    seed: int = 0

    @property
    def codebook(self) -> Tensor:
        """The ``(2^bits,)`` Lloyd-Max levels of N(0, 1)."""
        return lloyd_max_normal(self.bits)

    def encode_keys(self, k: Tensor, state: State) -> Encoded:
        x = as_float(k)
        d = x.shape[-1]
        y = x @ rotation(d, self.seed, x.device).T  # (B, H, T, D) rotated
        norm = x.norm(dim=-1, keepdim=True).clamp(max=_FP16_MAX).half()  # (B, H, T, 1), stored fp16
        n = norm.float()
        u = y * (math.sqrt(d) / torch.where(n > 0, n, torch.ones_like(n)))  # coordinates ~ N(0, 1)
        return {"codes": nearest_code(u, self.codebook.to(x.device)), "scale": norm}

    def decode_keys(self, enc: Encoded, state: State) -> Tensor:
        codes = enc["codes"]
        d = codes.shape[-1]
        u = self.codebook.to(codes.device)[codes.long()]  # (B, H, T, D)
        y = u * (enc["scale"].float() / math.sqrt(d))
        return y @ rotation(d, self.seed, codes.device)  # (B, H, T, D): Q^T y per vector

    encode_values = encode_keys
    decode_values = decode_keys

    def encoded_bits(self, enc: Encoded) -> int:
        return packed_bits(enc, self.bits)

    def bits_per_token(self, kv_heads: int, head_dim: int) -> float:
        check_head_dim(head_dim)  # before any model loads
        return 2.0 * kv_heads * (head_dim * self.bits + FP16_BITS)
