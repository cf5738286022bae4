"""The contract every KV-cache quantization method implements.

Shapes (one attention layer):
    keys, values   ``(B, H, T, D)``: batch, KV heads, tokens, head_dim.
    calibration    ``(N, H, D)``: N sampled token vectors of one layer.

A method is a small dataclass. Its fields are its full configuration (saved in artifacts as JSON);
``fit`` turns one layer's calibration statistics into a dict of tensors (the layer *state*, saved in
the artifact); ``encode_*`` turns K or V into a dict of tensors (codes as ``uint8`` one per element,
scales, outliers...), ``decode_*`` inverts it. ``encoded_bits(enc)`` counts exactly what an encoding costs
when stored packed. The first ``sink`` tokens and the residual window are kept in 16 bits by the
*caller* (simulated evaluation or the runtime cache): methods never see them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from ..errors import KvqError
from ..lazy import torch

if TYPE_CHECKING:
    from torch import Tensor

State = dict[str, "Tensor"]
Encoded = dict[str, "Tensor"]

#: Bits charged for one stored scale, zero point or outlier value (fp16).
FP16_BITS = 16
#: Bits charged for one sparse outlier: its fp16 value plus a 16-bit position inside its vector.
OUTLIER_BITS = 32


def pointer_block(head_dim: int) -> int:
    """Tokens per sparse-outlier row pointer: ``kvq_kernels.sparse.sparse_block`` (64, fewer where ``head_dim > 512``),
    restated here because the accounting imports no torch (tests hold the two equal)."""
    return min(64, (1 << 15) // head_dim)


def outlier_pointer_bits(kv_heads: int, head_dim: int, tokens: int) -> int:
    """Bits of one stream's sparse-outlier row pointers over ``tokens`` quantized tokens (``kvq_kernels.sparse``):
    an int32 per KV head and started block of ``pointer_block(head_dim)`` tokens, plus one per head."""
    if tokens <= 0:
        return 0
    return kv_heads * 32 * (-(-tokens // pointer_block(head_dim)) + 1)


@dataclass
class LayerCalibration:
    """Calibration statistics of one layer, gathered by ``kvq_cli.calibration.capture``.

    keys, values: ``(N, H, D)`` float32, a random subsample of token vectors (keys pre-RoPE when the
        method asks for it, else post-RoPE).
    key_fisher, value_fisher: ``(N, H, D)`` float32 squared gradients of the LM loss for the same
        entries, or None when the method needs no Fisher information.
    key_lo, key_hi: ``(H, D)`` float32, exact per-channel thresholds over *all* calibration tokens:
        the ``key_outlier_fraction / 2`` lower and upper quantiles (min and max at fraction 0).
    tokens: how many tokens the thresholds were computed over.
    """

    keys: Tensor
    values: Tensor
    key_fisher: Tensor | None = None
    value_fisher: Tensor | None = None
    key_lo: Tensor | None = None
    key_hi: Tensor | None = None
    tokens: int = 0


@dataclass
class KVMethod:
    """Base class: subclasses are dataclasses registered with ``@register``."""

    name: ClassVar[str] = ""
    #: True when ``fit`` needs calibration data (codebooks, thresholds); False for tuning-free methods.
    needs_calibration: ClassVar[bool] = False
    #: True when ``fit`` uses Fisher information (the capture then runs a backward pass).
    needs_fisher: ClassVar[bool] = False
    #: Bit widths the method supports.
    supported_bits: ClassVar[tuple[int, ...]] = ()

    bits: int = 4
    sink: int = 0  # first tokens kept in 16 bits (handled by the caller)
    residual: int = 0  # newest tokens kept in 16 bits (runtime only; handled by the caller)

    # ---- configuration -------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ``KvqError`` (one clear line) when the configuration is impossible."""
        if self.supported_bits and self.bits not in self.supported_bits:
            raise KvqError(f"{self.name} supports bits {list(self.supported_bits)}, not {self.bits}")
        if self.sink < 0 or self.residual < 0:
            raise KvqError("--sink and --residual must be >= 0")

    def config(self) -> dict[str, Any]:
        """Full configuration as a JSON-able dict (includes ``method``)."""
        return {"method": self.name, **dataclasses.asdict(self)}

    @property
    def label(self) -> str:
        """Short human name for tables, e.g. ``kvquant-3b-1%``."""
        return f"{self.name}-{self.bits}b"

    @property
    def keys_pre_rope(self) -> bool:
        """Whether keys are quantized before the rotary embedding."""
        return False

    def for_layer(self, index: int) -> KVMethod:
        """The configuration layer ``index`` runs: itself, unless the method gives layers their own bit widths
        (kvquant from ``kvq calibrate --avg-bits``)."""
        return self

    def stream_bits(self, is_key: bool) -> int:
        """Code width of the key (``is_key``) or value stream: ``bits`` unless the method sets them apart."""
        return self.bits

    @property
    def outlier_streams(self) -> int:
        """How many of K and V keep sparse outliers (each adds row pointers: ``outlier_pointer_bits``)."""
        return 2 if getattr(self, "outliers", 0) > 0 else 0

    @property
    def key_outlier_fraction(self) -> float:
        """Fraction of key entries the calibration thresholds ``key_lo``/``key_hi`` leave outside."""
        return 0.0

    # ---- the method ----------------------------------------------------------------------------
    def fit(self, calib: LayerCalibration) -> State:
        """One layer's state from its calibration statistics. Tuning-free methods return ``{}``."""
        return {}

    def encode_keys(self, k: Tensor, state: State) -> Encoded:
        """Encode keys ``(B, H, T, D)``."""
        raise NotImplementedError

    def decode_keys(self, enc: Encoded, state: State) -> Tensor:
        """Inverse of ``encode_keys``: ``(B, H, T, D)`` float32."""
        raise NotImplementedError

    def encode_values(self, v: Tensor, state: State) -> Encoded:
        """Encode values ``(B, H, T, D)``."""
        raise NotImplementedError

    def decode_values(self, enc: Encoded, state: State) -> Tensor:
        """Inverse of ``encode_values``: ``(B, H, T, D)`` float32."""
        raise NotImplementedError

    def fake_quant_keys(self, k: Tensor, state: State) -> Tensor:
        """Quantize-dequantize keys ``(B, H, T, D)``; returns k's dtype."""
        return self.decode_keys(self.encode_keys(k, state), state).to(k.dtype)

    def fake_quant_values(self, v: Tensor, state: State) -> Tensor:
        """Quantize-dequantize values ``(B, H, T, D)``; returns v's dtype."""
        return self.decode_values(self.encode_values(v, state), state).to(v.dtype)

    # ---- bit accounting ------------------------------------------------------------------------
    def encoded_bits(self, enc: Encoded) -> int:
        """Exact bits an encoding occupies when packed (codes, scales, zero points, outliers)."""
        raise NotImplementedError

    def bits_per_token(self, kv_heads: int, head_dim: int) -> float:
        """Expected bits per token per layer for K and V together (quantized tokens only).

        Analytic: codes + per-token or per-group overhead + outliers at their nominal fraction.
        ``estimate-memory`` and the runtime's ``nbytes`` use this; tests check it against ``encoded_bits``.
        """
        raise NotImplementedError

    def state_bits(self, state: State) -> int:
        """Bits of one layer's state (codebooks, thresholds), stored once per layer."""
        return sum(t.numel() * FP16_BITS for t in state.values())

    def state_bits_estimate(self, kv_heads: int, head_dim: int) -> int:
        """``state_bits`` of one layer as the configuration implies it, without calibration (0: no state)."""
        return 0

    # ---- artifact checks -----------------------------------------------------------------------
    def state_shapes(self, kv_heads: int, head_dim: int) -> dict[str, tuple[int, ...]]:
        """Name and shape of every tensor ``fit`` returns for one layer of this geometry (``{}``: no state)."""
        return {}

    def check_state(self, state: State) -> str | None:
        """Why one layer's state (shapes checked, finite) cannot have come from ``fit``, or None."""
        return None


def as_float(x: Tensor) -> Tensor:
    """float32 view of a tensor for quantization arithmetic."""
    return x if x.dtype == torch.float32 else x.float()
