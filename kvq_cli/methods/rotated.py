"""``kvquant-rot``: kvquant's calibrated, Fisher-weighted codebooks in turbo's rotated space.

The combination neither parent has (issue 21): each head vector ``x`` (keys pre-RoPE, as kvquant; values) is
rotated by turbo's fixed random-sign Hadamard matrix ``Q`` (``turbo.rotation``: the same ``Q`` for every layer
and head, from ``seed``, which also seeds the k-means), ``y = Q x``; everything kvquant does then happens on
``y``: per-channel key thresholds calibrated on rotated keys, per-vector scale/zero for values, the
dense-and-sparse outliers, one Fisher-weighted NUQ codebook per layer for K and one for V, Q-Norm. Decoding
un-rotates, ``x ~ Q^T y``.

Fisher information is captured for ``x``; the rotated coordinates' is not recorded (the capture keeps squared
gradients, not gradients). Every entry of ``Q`` is ``+-1/sqrt(D)``, so ``E[(Q g)_i^2] = |g|^2 / D`` up to cross
terms: each rotated entry is weighted with its vector's mean squared gradient (the per-vector sensitivity).

The rotation is fixed by the seed, so it costs no bits: the accounting is kvquant's (codes, fp16 scale and zero per
value vector, outliers at 32 bits and their row pointers, fp16 key thresholds, the codebooks). The packed runtime
cache and kernels do not rotate: ``runtime.cache.check_runtime`` refuses this method by name (simulated evaluation
and calibration only). ``rotate_keys`` / ``rotate_values`` switch the rotation off per stream (ablations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import KvqError
from .base import Encoded, LayerCalibration, State, as_float
from .kvquant import KVQuant
from .quant_ops import channel_thresholds
from .registry import register
from .turbo import is_pow2, rotation

if TYPE_CHECKING:
    from torch import Tensor


@register
@dataclass
class RotatedKVQuant(KVQuant):
    """kvquant on rotated head vectors. Encodings: kvquant's, of ``y = x @ Q.T`` (``(B, H, T, D)``)."""

    name = "kvquant-rot"

    rotate_keys: bool = True
    rotate_values: bool = True

    def validate(self) -> None:
        super().validate()
        if not (self.rotate_keys or self.rotate_values):
            raise KvqError("kvquant-rot rotates keys, values or both: rotate_keys and rotate_values are both false "
                           "(that is plain kvquant)")

    @property
    def label(self) -> str:
        base = super().label.replace("kvquant-", "kvquant-rot-", 1)
        if not self.rotate_keys:
            base += "-values-only"
        elif not self.rotate_values:
            base += "-keys-only"
        return base

    # ---- the rotation --------------------------------------------------------------------------
    def _rotate(self, x: Tensor, on: bool) -> Tensor:
        """``x (..., D)`` rotated, ``x @ Q.T`` (unchanged when ``on`` is false)."""
        return x @ rotation(x.shape[-1], self.seed, x.device).T if on else x

    def _unrotate(self, y: Tensor, on: bool) -> Tensor:
        """Inverse of ``_rotate``: ``y @ Q`` (``Q`` is orthogonal)."""
        return y @ rotation(y.shape[-1], self.seed, y.device) if on else y

    # ---- calibration ---------------------------------------------------------------------------
    def fit(self, calib: LayerCalibration) -> State:
        """kvquant's fit on the rotated ``(N, H, D)`` samples: key thresholds recomputed there (the capture's exact
        thresholds are for unrotated keys), Fisher information spread as each vector's mean (module docstring)."""
        keys = self._rotate(as_float(calib.keys), self.rotate_keys)
        key_lo = key_hi = None
        if self.per_channel and self.rotate_keys:
            key_lo, key_hi = channel_thresholds(keys, self.outliers)  # (H, D) over the samples
        elif self.per_channel:
            key_lo, key_hi = calib.key_lo, calib.key_hi
        rotated = LayerCalibration(
            keys=keys,
            values=self._rotate(as_float(calib.values), self.rotate_values),
            key_fisher=_spread(calib.key_fisher, self.rotate_keys),
            value_fisher=_spread(calib.value_fisher, self.rotate_values),
            key_lo=key_lo,
            key_hi=key_hi,
            tokens=calib.tokens,
        )
        return super().fit(rotated)

    # ---- keys and values -----------------------------------------------------------------------
    def encode_keys(self, k: Tensor, state: State) -> Encoded:
        return super().encode_keys(self._rotate(as_float(k), self.rotate_keys), state)

    def decode_keys(self, enc: Encoded, state: State) -> Tensor:
        return self._unrotate(super().decode_keys(enc, state), self.rotate_keys)

    def encode_values(self, v: Tensor, state: State) -> Encoded:
        return super().encode_values(self._rotate(as_float(v), self.rotate_values), state)

    def decode_values(self, enc: Encoded, state: State) -> Tensor:
        return self._unrotate(super().decode_values(enc, state), self.rotate_values)

    # ---- bit accounting ------------------------------------------------------------------------
    def bits_per_token(self, kv_heads: int, head_dim: int) -> float:
        """kvquant's (the rotation is fixed by its seed and stores nothing); ``KvqError`` for a head_dim that
        is not a power of two, before any model loads."""
        if not is_pow2(head_dim):
            raise KvqError(f"kvquant-rot needs a head_dim that is a power of two (turbo's Hadamard rotation), "
                           f"not {head_dim}")
        return super().bits_per_token(kv_heads, head_dim)


def _spread(fisher: Tensor | None, on: bool) -> Tensor | None:
    """Squared gradients ``(N, H, D)`` as weights of rotated entries: each vector's mean over ``D``."""
    if fisher is None or not on:
        return fisher
    return fisher.float().mean(dim=-1, keepdim=True).expand_as(fisher)
