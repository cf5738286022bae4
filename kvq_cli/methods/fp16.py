"""``fp16``: keys and values stored in 16 bits (the reference point; switchable to pre-RoPE keys)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..lazy import torch
from .base import Encoded, KVMethod, State
from .registry import register

if TYPE_CHECKING:
    from torch import Tensor


@register
@dataclass
class FP16(KVMethod):
    """No quantization: K and V rounded to float16. With ``pre_rope`` the keys are stored before RoPE."""

    name = "fp16"
    supported_bits = (16,)

    bits: int = 16
    pre_rope: bool = False

    @property
    def label(self) -> str:
        return "fp16-pre-rope" if self.pre_rope else "fp16"

    @property
    def keys_pre_rope(self) -> bool:
        return self.pre_rope

    def encode_keys(self, k: Tensor, state: State) -> Encoded:
        return {"data": k.to(torch.float16)}

    def decode_keys(self, enc: Encoded, state: State) -> Tensor:
        return enc["data"].float()

    encode_values = encode_keys
    decode_values = decode_keys

    def encoded_bits(self, enc: Encoded) -> int:
        return enc["data"].numel() * 16

    def bits_per_token(self, kv_heads: int, head_dim: int) -> float:
        return 2.0 * kv_heads * head_dim * 16
