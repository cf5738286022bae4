"""kvq Triton kernels (imported as ``kvq_kernels``)."""

from .reference import KIVICache, KVQuantCache
from .token_reference import TokenCache

__all__ = [
    "KIVICache",
    "KVQuantCache",
    "TokenCache",
    "append_kvquant",
    "decode_attention_kivi",
    "decode_attention_kvquant",
    "decode_attention_token",
    "dequantize_packed_kivi",
    "dequantize_packed_kvquant",
    "pack_codes",
    "quantize_append_kivi",
    "unpack_codes",
]


def __getattr__(name):  # Triton is optional: import the kernels lazily
    if name == "append_kvquant":
        from . import append

        return append.append_kvquant
    if name in ("pack_codes", "unpack_codes", "quantize_append_kivi"):
        from . import pack

        return getattr(pack, name)
    if name in ("decode_attention_kivi", "decode_attention_kvquant", "dequantize_packed_kivi",
                "dequantize_packed_kvquant"):
        from . import decode_attention

        return getattr(decode_attention, name)
    if name == "decode_attention_token":
        from . import decode_token

        return decode_token.decode_attention_token
    raise AttributeError(name)
