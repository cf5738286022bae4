"""Per-token baselines on post-RoPE keys: ``int`` (uniform asymmetric) and ``nf`` (NormalFloat).

Both quantize each head vector ``(b, h, t, :)`` of D entries as one group, keys and values alike.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..lazy import torch
from .base import FP16_BITS, Encoded, KVMethod, State, as_float
from .quant_ops import fp16_ceil, minmax_dequantize, minmax_quantize, nearest_code, normal_float_codebook, packed_bits
from .registry import register

if TYPE_CHECKING:
    from torch import Tensor


@register
@dataclass
class UniformInt(KVMethod):
    """Uniform asymmetric min/max quantization, one fp16 scale and zero point per head vector.

    Encoding of ``x (B, H, T, D)``: ``codes`` uint8 ``(B, H, T, D)``, ``scale`` and ``zero`` float16
    ``(B, H, T, 1)``.
    """

    name = "int"
    supported_bits = (2, 3, 4, 8)

    bits: int = 4

    def encode_keys(self, k: Tensor, state: State) -> Encoded:
        codes, scale, zero = minmax_quantize(as_float(k), self.bits, dim=-1)  # (B, H, T, D), (B, H, T, 1) x2
        return {"codes": codes, "scale": scale, "zero": zero}

    def decode_keys(self, enc: Encoded, state: State) -> Tensor:
        return minmax_dequantize(enc["codes"], enc["scale"], enc["zero"])

    encode_values = encode_keys
    decode_values = decode_keys

    def encoded_bits(self, enc: Encoded) -> int:
        return packed_bits(enc, self.bits)

    def bits_per_token(self, kv_heads: int, head_dim: int) -> float:
        return 2.0 * kv_heads * (head_dim * self.bits + 2 * FP16_BITS)


@functools.cache
def _levels_on(bits: int, device: torch.device) -> Tensor:
    """``normal_float_codebook(bits)`` on ``device``, made once: encoding inside a captured CUDA-graph step copies no
    host tensor, and the decode kernel reads one table at a fixed address. (A normal tensor even when first asked for
    under ``torch.inference_mode``.)"""
    with torch.inference_mode(False):
        return normal_float_codebook(bits).to(device)


@register
@dataclass
class NormalFloat(KVMethod):
    """NormalFloat codes (normal quantiles in [-1, 1] with an exact 0) after per-vector absmax scaling.

    Encoding of ``x (B, H, T, D)``: ``codes`` uint8 ``(B, H, T, D)`` indexing ``normal_float_codebook(bits)``,
    ``scale`` float16 ``(B, H, T, 1)`` (the vector's absmax, rounded up).
    """

    name = "nf"
    supported_bits = (2, 3, 4)

    bits: int = 4

    @property
    def codebook(self) -> Tensor:
        """The ``(2^bits,)`` NormalFloat levels."""
        return normal_float_codebook(self.bits)

    def levels(self, device: torch.device) -> Tensor:
        """``codebook`` float32 on ``device``, one tensor per (bits, device)."""
        return _levels_on(self.bits, torch.device(device))

    def encode_keys(self, k: Tensor, state: State) -> Encoded:
        x = as_float(k)
        scale = fp16_ceil(x.abs().amax(-1, keepdim=True))  # (B, H, T, 1)
        s = scale.float()
        y = (x / torch.where(s > 0, s, torch.ones_like(s))).clamp(-1, 1)  # (B, H, T, D)
        return {"codes": nearest_code(y, self.levels(x.device)), "scale": scale}

    def decode_keys(self, enc: Encoded, state: State) -> Tensor:
        return self.levels(enc["codes"].device)[enc["codes"].long()] * enc["scale"].float()

    encode_values = encode_keys
    decode_values = decode_keys

    def encoded_bits(self, enc: Encoded) -> int:
        return packed_bits(enc, self.bits)

    def bits_per_token(self, kv_heads: int, head_dim: int) -> float:
        return 2.0 * kv_heads * (head_dim * self.bits + FP16_BITS)
