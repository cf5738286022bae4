"""``kivi``: tuning-free asymmetric quantization, keys per channel and values per token (arXiv 2402.02750).

Keys: for each ``(b, h, d)`` the tokens are split into consecutive groups of ``group`` tokens (a final
partial group is its own group), each with an fp16 scale and zero point. Values: each ``(b, h, t)`` vector
is split into groups of ``group`` channels the same way. Keys are post-RoPE. The full-precision residual
window (``residual`` newest tokens) is kept by the caller.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import KvqError
from .base import FP16_BITS, Encoded, KVMethod, State, as_float
from .quant_ops import minmax_dequantize, minmax_quantize, packed_bits, pad_to_multiple
from .registry import register

if TYPE_CHECKING:
    from torch import Tensor


@register
@dataclass
class KIVI(KVMethod):
    """KIVI with ``group``-sized groups along tokens (keys) and along channels (values).

    Encodings of ``x (B, H, T, D)`` with ``Gt = ceil(T / group)``, ``Gd = ceil(D / group)``:
    keys: ``codes`` uint8 ``(B, H, T, D)``, ``scale``/``zero`` float16 ``(B, H, Gt, D)``;
    values: ``codes`` uint8 ``(B, H, T, D)``, ``scale``/``zero`` float16 ``(B, H, T, Gd)``.
    """

    name = "kivi"
    supported_bits = (2, 4)

    bits: int = 2
    residual: int = 128
    group: int = 32

    def validate(self) -> None:
        super().validate()
        if self.group < 1:
            raise KvqError(f"kivi --group must be >= 1, not {self.group}")

    @property
    def label(self) -> str:
        return f"kivi-{self.bits}b" + ("" if self.group == 32 else f"-g{self.group}")

    def encode_keys(self, k: Tensor, state: State) -> Encoded:
        B, H, T, D = k.shape
        x = pad_to_multiple(as_float(k), 2, self.group)  # (B, H, Gt * group, D)
        x = x.reshape(B, H, -1, self.group, D)  # (B, H, Gt, group, D)
        codes, scale, zero = minmax_quantize(x, self.bits, dim=3)  # scale, zero (B, H, Gt, 1, D)
        codes = codes.reshape(B, H, -1, D)[:, :, :T]  # (B, H, T, D)
        return {"codes": codes, "scale": scale.squeeze(3), "zero": zero.squeeze(3)}

    def decode_keys(self, enc: Encoded, state: State) -> Tensor:
        codes = enc["codes"]
        B, H, T, D = codes.shape
        c = pad_to_multiple(codes, 2, self.group).reshape(B, H, -1, self.group, D)  # (B, H, Gt, group, D)
        x = minmax_dequantize(c, enc["scale"].unsqueeze(3), enc["zero"].unsqueeze(3))
        return x.reshape(B, H, -1, D)[:, :, :T]  # (B, H, T, D)

    def encode_values(self, v: Tensor, state: State) -> Encoded:
        B, H, T, D = v.shape
        x = pad_to_multiple(as_float(v), 3, self.group).reshape(B, H, T, -1, self.group)  # (B, H, T, Gd, group)
        codes, scale, zero = minmax_quantize(x, self.bits, dim=4)  # scale, zero (B, H, T, Gd, 1)
        codes = codes.reshape(B, H, T, -1)[..., :D]  # (B, H, T, D)
        return {"codes": codes, "scale": scale.squeeze(4), "zero": zero.squeeze(4)}

    def decode_values(self, enc: Encoded, state: State) -> Tensor:
        codes = enc["codes"]
        B, H, T, D = codes.shape
        c = pad_to_multiple(codes, 3, self.group).reshape(B, H, T, -1, self.group)  # (B, H, T, Gd, group)
        x = minmax_dequantize(c, enc["scale"].unsqueeze(4), enc["zero"].unsqueeze(4))
        return x.reshape(B, H, T, -1)[..., :D]  # (B, H, T, D)

    def encoded_bits(self, enc: Encoded) -> int:
        return packed_bits(enc, self.bits)

    def bits_per_token(self, kv_heads: int, head_dim: int) -> float:
        key = head_dim * self.bits + 2 * FP16_BITS * head_dim / self.group  # per-channel groups over `group` tokens
        value = head_dim * self.bits + 2 * FP16_BITS * math.ceil(head_dim / self.group)
        return float(kv_heads * (key + value))
