"""Bit widths per layer, keys and values apart, under an average-bits budget (``kvq calibrate --avg-bits``).

For every layer and every width ``b`` in 1-4, kvquant (or kvquant-rot, in its rotated space) is fitted at ``b`` bits
on the layer's calibration samples and the *error curve* measured on those same samples: the Fisher-weighted squared
error ``sum F (x - Q_b(x))^2`` of the keys and of the values apart (plain squared error with ``fisher=False``),
which approximates the loss increase that quantizing the stream adds (the diagonal-Fisher second-order term). A
dynamic program over the 2L streams then picks one width per stream minimizing the summed error at each total code
width; the widest total whose configuration the accounting (``accounting.avg_bits``, at the calibration's
``seqlen``: codes, scales, outliers and their pointers, codebooks, thresholds, the 16-bit sink and residual window)
holds within the budget wins. Every width step costs each stream the same ``H * D`` bits per token, so the total
code width orders the candidates by cost up to the codebooks (at most ``16 * 2^4`` bits a stream), which the exact
check settles.

With ``--outliers auto`` the outlier fraction is searched too (``allocate_with_outliers``): the curves and the
allocation are computed at each fraction of ``OUTLIER_FRACTIONS`` (one capture: ``capture.capture_each``) and the
allocation with the least summed error within the budget wins. The errors are comparable (the same error on the same
samples) and the accounting charges each fraction its outliers: what outliers cost in bits, the widths give up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from ..accounting import avg_bits
from ..errors import KvqError
from ..methods.base import KVMethod, LayerCalibration, State

WIDTHS = (1, 2, 3, 4)
#: Outlier fractions ``kvq calibrate --avg-bits B --outliers auto`` tries (``allocate_with_outliers``).
OUTLIER_FRACTIONS = (0.0, 0.005, 0.01)


def _uniform(method: KVMethod, bits: int) -> KVMethod:
    return dataclasses.replace(method, bits=bits, value_bits=0, layer_bits="")


def mixed(method: KVMethod, widths: list[tuple[int, int]]) -> KVMethod:
    """``method`` with ``(key bits, value bits)`` per layer (``layer_bits``; ``bits`` the widest)."""
    text = "-".join(f"{k}{v}" for k, v in widths)
    return dataclasses.replace(method, bits=max(max(w) for w in widths), value_bits=0, layer_bits=text)


def _weighted_error(x: Tensor, xq: Tensor, fisher: Tensor | None, dims=None) -> Tensor:
    """``sum F (xq - x)^2`` float64, over ``dims`` (all when None)."""
    d = (xq - x).square()
    d = (d * fisher if fisher is not None else d).double()
    return d.sum() if dims is None else d.sum(dim=dims)


def _fits(method: KVMethod, calib: LayerCalibration):
    """For each width of ``WIDTHS``: ``(index, bits, state, [(samples, fake-quantized, Fisher or None)] for keys
    and values)``, the samples shaped ``(1, H, N, D)`` as the cache sees a sequence."""
    def seq(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.float().transpose(0, 1)[None]

    keys, values = seq(calib.keys), seq(calib.values)
    kf, vf = (seq(f) if method.fisher else None for f in (calib.key_fisher, calib.value_fisher))
    for j, bits in enumerate(WIDTHS):
        m = _uniform(method, bits)
        state = m.fit(calib)
        yield j, bits, state, [(keys, m.fake_quant_keys(keys, state), kf),
                               (values, m.fake_quant_values(values, state), vf)]


def error_curves(method: KVMethod, stats: list[LayerCalibration], progress: Callable[[int], None] | None = None
                 ) -> tuple[Tensor, list[dict[int, State]]]:
    """Errors ``(L, 2, 4)`` float64 (layer, keys/values, width 1-4) and each layer's state fitted at each width."""
    errors = torch.zeros(len(stats), 2, len(WIDTHS), dtype=torch.float64)
    states: list[dict[int, State]] = []
    for i, calib in enumerate(stats):
        per_width: dict[int, State] = {}
        for j, bits, state, streams in _fits(method, calib):
            for s, (x, xq, f) in enumerate(streams):
                errors[i, s, j] = _weighted_error(x, xq, f)
            per_width[bits] = {k: v.cpu() for k, v in state.items()}
        states.append(per_width)
        if progress:
            progress(1)
    return errors, states


def head_error_curves(method: KVMethod, stats: list[LayerCalibration]) -> Tensor:
    """``error_curves``' errors per KV head, ``(L, 2, H, 4)`` float64, with the same fit per layer and width
    (``bench/per_head_widths.py`` asks whether widths per head would pay)."""
    out = []
    for calib in stats:
        layer = torch.zeros(2, calib.keys.shape[1], len(WIDTHS), dtype=torch.float64)
        for j, _, _, streams in _fits(method, calib):
            for s, (x, xq, f) in enumerate(streams):
                layer[s, :, j] = _weighted_error(x, xq, f, dims=(0, 2, 3))
        out.append(layer)
    return torch.stack(out)


def _best_by_total(errors: Tensor) -> dict[int, tuple[float, list[int]]]:
    """For each total width over the ``S = 2L`` streams: the least summed error and the widths that reach it."""
    streams = errors.reshape(-1, len(WIDTHS))  # (2L, 4): layer 0 keys, layer 0 values, layer 1 keys, ...
    best: dict[int, tuple[float, list[int]]] = {0: (0.0, [])}
    for row in streams.tolist():
        nxt: dict[int, tuple[float, list[int]]] = {}
        for total, (err, picks) in best.items():
            for bits, e in zip(WIDTHS, row, strict=True):
                cand = (err + e, picks + [bits])
                if total + bits not in nxt or cand[0] < nxt[total + bits][0]:
                    nxt[total + bits] = cand
        best = nxt
    return best


def allocate(method: KVMethod, errors: Tensor, states: list[dict[int, State]], geom, seqlen: int, budget: float
             ) -> tuple[KVMethod, list[State], dict]:
    """The mixed configuration with the least summed error whose average bits at ``seqlen`` are at most ``budget``:
    ``(method, per-layer states, a record for the artifact)``."""
    found = _within_budget(method, errors, states, geom, seqlen, budget)
    if found is None:
        raise KvqError(f"--avg-bits {budget:g} is below what {method.name} can hold here (1 bit everywhere: "
                       f"{least_avg_bits(method, geom, seqlen):.3f} bits at {seqlen:,} tokens)")
    return found


def _within_budget(method: KVMethod, errors: Tensor, states: list[dict[int, State]], geom, seqlen: int,
                   budget: float) -> tuple[KVMethod, list[State], dict] | None:
    """``allocate``'s answer, or None when no configuration holds within ``budget``."""
    best = _best_by_total(errors)
    for total in sorted(best, reverse=True):
        err, picks = best[total]
        widths = list(zip(picks[0::2], picks[1::2], strict=True))  # (key, value) per layer
        chosen = [{"key_lo": s[k]["key_lo"], "key_hi": s[k]["key_hi"], "key_codebook": s[k]["key_codebook"],
                   "value_codebook": s[v]["value_codebook"]} if "key_lo" in s[k] else
                  {"key_codebook": s[k]["key_codebook"], "value_codebook": s[v]["value_codebook"]}
                  for s, (k, v) in zip(states, widths, strict=True)]
        m = mixed(method, widths)
        state_bits = sum(m.for_layer(i).state_bits(s) for i, s in enumerate(chosen))
        bits = avg_bits(m, geom, seqlen, state_bits, with_residual=True)
        if bits <= budget:
            uniform = {b: float(errors[:, :, WIDTHS.index(b)].sum()) for b in WIDTHS}
            record = {"avg_bits_budget": budget, "avg_bits": bits, "at_tokens": seqlen,
                      "criterion": "fisher-weighted squared error" if method.fisher else "squared error",
                      "widths": [list(w) for w in widths], "error": err,
                      "error_uniform": {f"{b}": e for b, e in uniform.items()},
                      "curves": [[[float(e) for e in row] for row in layer] for layer in errors]}
            return m, chosen, record
    return None


def allocate_with_outliers(method: KVMethod, stats_each: list[list[LayerCalibration]], geom, seqlen: int,
                           budget: float, progress: Callable[[int], None] | None = None,
                           fractions: tuple[float, ...] = OUTLIER_FRACTIONS) -> tuple[KVMethod, list[State], dict]:
    """``allocate`` at each outlier fraction of ``fractions`` (``stats_each[i]``: the calibrations captured for
    ``fractions[i]``, ``capture.capture_each``); the answer with the least summed error within ``budget`` (the
    first of them on a tie). Its record adds ``outliers`` (the fraction chosen) and ``outlier_search``: each
    fraction's least error (``"0.005": err``), None where nothing at that fraction holds within the budget."""
    best, tried = None, {}
    for fraction, stats in zip(fractions, stats_each, strict=True):
        m = dataclasses.replace(method, outliers=fraction)
        found = None
        if least_avg_bits(m, geom, seqlen) <= budget:
            found = _within_budget(m, *error_curves(m, stats, progress), geom, seqlen, budget)
        elif progress:
            progress(len(stats))
        tried[f"{fraction:g}"] = None if found is None else found[2]["error"]
        if found is not None and (best is None or found[2]["error"] < best[2]["error"]):
            best = found
    if best is None:
        raise KvqError(f"--avg-bits {budget:g} is below what {method.name} can hold here at any outlier fraction "
                       f"tried ({', '.join(tried)}; 1 bit everywhere, no outliers: "
                       f"{least_avg_bits(dataclasses.replace(method, outliers=0.0), geom, seqlen):.3f} bits at "
                       f"{seqlen:,} tokens)")
    m, states, record = best
    return m, states, {**record, "outliers": m.outliers, "outlier_search": tried}


def least_avg_bits(method: KVMethod, geom, seqlen: int) -> float:
    """Average bits of 1-bit keys and values in every layer, state estimated from the configuration."""
    m = _uniform(method, 1)
    return avg_bits(m, geom, seqlen, geom.layers * m.state_bits_estimate(geom.kv_heads, geom.head_dim),
                    with_residual=True)
