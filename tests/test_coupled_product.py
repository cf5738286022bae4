"""Coupled Quantization (``cq``) and MILLION product quantization (``pq``): codebooks, bits, scores, evaluation."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from kvq_cli.calibration import weighted_kmeans
from kvq_cli.calibration.capture import capture
from kvq_cli.errors import KvqError
from kvq_cli.methods import LayerCalibration, available, make_method, method_from_config
from kvq_cli.methods.base import OUTLIER_BITS
from kvq_cli.perplexity import Configuration, evaluate

H, D = 2, 16
N_CALIB = 2048


def correlated(n: int, seed: int, heads: int = H, dim: int = D) -> torch.Tensor:
    """``(n, heads, dim)`` vectors with coupled channels: one latent per group of 4 channels (random loadings)
    plus ``z @ A``, a weaker random mixing of all channels."""
    fixed = torch.Generator().manual_seed(100)
    mix = torch.randn(heads, dim, dim, generator=fixed) / math.sqrt(dim)
    load = torch.randn(heads, dim, generator=fixed)
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, heads, dim // 4, generator=g).repeat_interleave(4, dim=-1) * load
    return latent + 0.3 * torch.einsum("nhd,hde->nhe", torch.randn(n, heads, dim, generator=g), mix)


def calibration(n: int = N_CALIB, fisher: bool = True) -> LayerCalibration:
    keys, values = correlated(n, 1), correlated(n, 2)
    g = torch.Generator().manual_seed(3)
    kf, vf = (torch.rand(n, H, D, generator=g) + 0.01 for _ in range(2)) if fisher else (None, None)
    return LayerCalibration(keys, values, kf, vf, tokens=n)


def as_bhtd(x: torch.Tensor) -> torch.Tensor:
    """``(N, H, D)`` -> ``(1, H, N, D)``."""
    return x.transpose(0, 1)[None]


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).norm() / x.norm()).item()


def round_trip(method, state, x: torch.Tensor) -> float:
    """Relative error of the keys and values round trips of ``x (B, H, T, D)``."""
    k = method.decode_keys(method.encode_keys(x, state), state)
    v = method.decode_values(method.encode_values(x, state), state)
    return (rel_err(x, k) + rel_err(x, v)) / 2


def fitted(name: str, calib: LayerCalibration | None = None, **opts):
    method = make_method(name, kmeans_iters=15, **opts)
    return method, method.fit(calib or calibration())


TEST = as_bhtd(correlated(512, 7))


# ---- round trips ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "opts"), [("cq", {"channels": 2}), ("pq", {"subspaces": 8})])
def test_error_decreases_with_bits(name, opts):
    errors = []
    for bits in (2, 4, 6):
        method, state = fitted(name, bits=bits, **opts)
        enc = method.encode_keys(TEST, state)
        assert enc["codes"].dtype == torch.int16
        out = method.decode_keys(enc, state)
        assert out.shape == TEST.shape and out.dtype == torch.float32
        errors.append(round_trip(method, state, TEST))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.2


def test_cq_one_channel_is_per_channel_scalar_kmeans():
    calib = calibration(fisher=False)
    method, state = fitted("cq", calib, bits=3, channels=1, fisher=False)
    assert state["key_codebook"].shape == (H, D, 8, 1)
    out = method.decode_keys(method.encode_keys(TEST, state), state)
    # reference: 1-D k-means per channel of head 0, nearest-level quantization
    ref = torch.empty(TEST.shape[2], D)
    for ch in range(D):
        levels = weighted_kmeans(calib.keys[:, 0, ch], 8, iters=15)
        ref[:, ch] = levels[(TEST[0, 0, :, ch, None] - levels).abs().argmin(-1)]
    assert rel_err(TEST[0, 0], out[0, 0]) == pytest.approx(rel_err(TEST[0, 0], ref), rel=0.05)
    # each channel's codebook is sorted 1-D levels (the scalar k-means solution)
    torch.testing.assert_close(state["key_codebook"][0, 0, :, 0], weighted_kmeans(calib.keys[:, 0, 0], 8, iters=15),
                               rtol=0.05, atol=0.05)


@pytest.mark.parametrize(("coupled", "scalar"), [((2, 8), (1, 4)), ((4, 8), (1, 2))])
def test_coupled_channels_beat_scalar_at_equal_bits(coupled, scalar):
    """The paper's point: at equal bits per channel, coupling channels of correlated data lowers the error."""
    (c1, b1), (c2, b2) = coupled, scalar
    assert b1 / c1 == b2 / c2
    m1, s1 = fitted("cq", channels=c1, bits=b1)
    m2, s2 = fitted("cq", channels=c2, bits=b2)
    assert m1.bits_per_token(H, D) == m2.bits_per_token(H, D)
    assert round_trip(m1, s1, TEST) < 0.8 * round_trip(m2, s2, TEST)


def heavy_cluster_errors(name: str, **options) -> dict[bool, float]:
    """Key reconstruction error of a rare, larger-magnitude cluster with heavy Fisher weight, for a method
    ``name`` fitted with ``fisher=True`` and ``fisher=False``: ``{use: error}``."""
    n = N_CALIB
    keys = correlated(n, 1)
    heavy = torch.zeros(n, dtype=torch.bool)
    heavy[: n // 20] = True
    keys[heavy] = keys[heavy] * 4 + 3
    fisher = torch.where(heavy[:, None, None], 1000.0, 1.0).expand(n, H, D).clone()
    calib = LayerCalibration(keys, keys.clone(), fisher, fisher.clone(), tokens=n)
    x = as_bhtd(keys[heavy])
    errs = {}
    for use in (True, False):
        method, state = fitted(name, calib, fisher=use, **options)
        errs[use] = rel_err(x, method.decode_keys(method.encode_keys(x, state), state))
    return errs


def test_fisher_weighting_pulls_centroids():
    """Vectors with heavy Fisher weight (a rare, larger-magnitude cluster) are served better when weighted."""
    errs = heavy_cluster_errors("cq", bits=3, channels=4)
    assert errs[True] < 0.8 * errs[False]
    assert make_method("cq").needs_fisher and not make_method("cq", fisher=False).needs_fisher
    assert not make_method("pq").needs_fisher


def test_missing_fisher_falls_back_to_unweighted():
    m1, s1 = fitted("cq", calibration(fisher=False), bits=4, fisher=True)
    m2, s2 = fitted("cq", calibration(fisher=False), bits=4, fisher=False)
    torch.testing.assert_close(s1["key_codebook"], s2["key_codebook"])


def test_fewer_vectors_than_centroids():
    method, state = fitted("cq", calibration(n=20), bits=6, channels=2)
    assert state["key_codebook"].shape == (H, D // 2, 64, 2)
    x = as_bhtd(calibration(n=20).keys)
    # every point a centroid, up to the codebooks' fp16 rounding (relative error <= 2^-11 per entry)
    assert rel_err(x, method.decode_keys(method.encode_keys(x, state), state)) <= 2**-11
    method, state = fitted("pq", calibration(n=10), bits=6)
    assert state["key_codebook"].shape == (D // 2, 64, 2)


# ---- bits ------------------------------------------------------------------------------------------------


def test_cq_bits_hand_count_and_outliers():
    x = as_bhtd(correlated(10, 9)).repeat(2, 1, 1, 1)  # (B=2, H, T=10, D)
    method, state = fitted("cq", bits=6, channels=4)
    enc = method.encode_keys(x, state)
    assert enc["codes"].shape == (2, H, 10, D // 4)
    assert method.encoded_bits(enc) == 2 * H * 10 * (D // 4) * 6
    assert method.bits_per_token(H, D) == 2 * H * (D // 4) * 6
    assert method.state_bits_estimate(H, D) == method.state_bits(state) == 16 * 2 * H * (D // 4) * 64 * 4

    _check_outliers(x, "cq", 2 * H * 10 * (D // 4) * 6, bits=6, channels=4)


def _check_outliers(x, name, code_bits, **opts):
    """``name`` with 10% sparse outliers on ``x (2, H, 10, D)``: 2 per side per token, each at OUTLIER_BITS on top
    of ``code_bits``, the accounting's per-token bits exact, outliers back exactly (fp16), and a better round trip
    than without. Returns the method, its state, the key encoding and its decoding."""
    method, state = fitted(name, outliers=0.1, **opts)  # round(0.1 * 32 / 2) = 2 per side
    enc_k, enc_v = method.encode_keys(x, state), method.encode_values(x, state)
    assert int(enc_k["outlier_mask"].sum()) == 2 * 10 * 4
    assert method.encoded_bits(enc_k) == code_bits + 2 * 10 * 4 * OUTLIER_BITS
    per_token = (method.encoded_bits(enc_k) + method.encoded_bits(enc_v)) / (2 * 10)
    assert per_token == method.bits_per_token(H, D)
    out = method.decode_keys(enc_k, state)
    torch.testing.assert_close(out[enc_k["outlier_mask"]], x[enc_k["outlier_mask"]].half().float())
    plain, pstate = fitted(name, **opts)
    assert rel_err(x, out) < rel_err(x, plain.decode_keys(plain.encode_keys(x, pstate), pstate))
    return method, state, enc_k, out


def test_pq_bits_hand_count():
    x = as_bhtd(correlated(12, 9)).repeat(3, 1, 1, 1)  # (B=3, H, T=12, D)
    method, state = fitted("pq", bits=5, subspaces=4)
    assert state["key_codebook"].shape == (4, 32, D // 4)
    enc_k, enc_v = method.encode_keys(x, state), method.encode_values(x, state)
    assert enc_k["codes"].shape == (3, H, 12, 4)
    assert method.encoded_bits(enc_k) == 3 * H * 12 * 4 * 5
    per_token = (method.encoded_bits(enc_k) + method.encoded_bits(enc_v)) / (3 * 12)
    assert per_token == method.bits_per_token(H, D) == 2 * H * 4 * 5
    assert method.state_bits_estimate(H, D) == method.state_bits(state)
    default, _ = fitted("pq", bits=8)
    assert default.bits_per_token(H, D) == 2 * H * (D // 2) * 8  # 4 bits per element


# ---- validation, labels, registry ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cq", "pq"])
@pytest.mark.parametrize("bits", [0, 13])
def test_validate_refuses_bits(name, bits):
    with pytest.raises(KvqError, match="bits"):
        make_method(name, bits=bits)


def test_validate_refuses_bad_groups():
    with pytest.raises(KvqError, match="channels"):
        make_method("cq", channels=0)
    with pytest.raises(KvqError, match="outliers"):
        make_method("cq", outliers=0.5)
    with pytest.raises(KvqError, match="subspaces"):
        make_method("pq", subspaces=-1)
    with pytest.raises(KvqError, match="divide head_dim"):
        make_method("cq", channels=3).fit(calibration())
    with pytest.raises(KvqError, match="divide head_dim"):
        make_method("pq", subspaces=3).fit(calibration())
    method, state = fitted("cq", bits=2, channels=4)
    with pytest.raises(KvqError, match="divide head_dim"):
        make_method("cq", bits=2, channels=3).encode_keys(TEST, state)


def test_labels_registry_and_config():
    assert {"cq", "pq"} <= set(available())
    assert make_method("cq", channels=4, bits=8).label == "cq-4c8b"
    assert make_method("cq", channels=8, bits=10, outliers=0.01, pre_rope=False, fisher=False).label == (
        "cq-8c10b-1%-post-rope-no-fisher"
    )
    assert make_method("pq", subspaces=32, bits=8).label == "pq-m32x8b"
    assert make_method("pq").label == "pq-d2x8b"
    assert make_method("cq").keys_pre_rope and not make_method("cq", pre_rope=False).keys_pre_rope
    assert not make_method("pq").keys_pre_rope and make_method("pq").residual == 128
    for method in (make_method("cq", channels=2, outliers=0.01), make_method("pq", subspaces=4)):
        assert method_from_config(method.config()) == method


# ---- MILLION's lookup-table scores ------------------------------------------------------------------------


@pytest.mark.parametrize("subspaces", [0, 4])
def test_pq_lookup_scores_match_dense_scores_gqa(subspaces):
    method, state = fitted("pq", bits=5, subspaces=subspaces)
    keys = as_bhtd(correlated(40, 11)).repeat(2, 1, 1, 1)  # (B=2, H, Tk=40, D)
    enc = method.encode_keys(keys, state)
    q = torch.randn(2, 2 * H, 7, D, generator=torch.Generator().manual_seed(12))  # Hq = 2H
    scores = method.lookup_scores(q, enc, state)
    assert scores.shape == (2, 2 * H, 7, 40)
    dense = q @ method.decode_keys(enc, state).repeat_interleave(2, dim=1).transpose(-1, -2)
    assert ((scores - dense).norm() / dense.norm()).item() < 1e-4
    torch.testing.assert_close(scores, dense, rtol=1e-4, atol=1e-4)


# ---- end to end on a tiny model ----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", [{"name": "cq", "channels": 4, "bits": 5},
                                  {"name": "cq", "channels": 2, "bits": 4, "outliers": 0.05},
                                  {"name": "pq", "bits": 4, "residual": 0}])
def test_evaluate_on_tiny_model(spec):
    opts = dict(spec)
    model = tiny_model("llama")
    method = make_method(opts.pop("name"), kmeans_iters=10, **opts)
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(5))
    stats = capture(model, ids, method, max_tokens=64)
    assert (stats[0].key_fisher is not None) == method.needs_fisher
    states = [method.fit(s) for s in stats]
    windows = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(6))
    base, row = evaluate(model, windows, [Configuration(method.label, method, states)])
    assert math.isfinite(row["perplexity"]) and math.isfinite(row["kl_divergence"]) and row["kl_divergence"] > 0
    assert math.isfinite(base["perplexity"]) and base["kl_divergence"] == 0


# ---- pq options beyond MILLION: Fisher weighting, per-head codebooks, RoPE-pair key subspaces ---------------


def test_rope_pair_order():
    from kvq_cli.methods.product import rope_pair_order

    order = rope_pair_order(8)
    assert order.tolist() == [0, 4, 1, 5, 2, 6, 3, 7]
    x = torch.randn(3, 8)
    torch.testing.assert_close(x[..., order][..., order.argsort()], x)
    assert rope_pair_order(5).tolist() == list(range(5))


def test_pq_labels_and_config():
    assert make_method("pq", fisher=True).label == "pq-d2x8b-fisher"
    assert make_method("pq", head_codebooks=True, rope_pairs=True).label == "pq-d2x8b-heads-rp"
    assert make_method("pq", subspaces=8, bits=6, fisher=True, rope_pairs=True).label == "pq-m8x6b-fisher-rp"
    assert make_method("pq", sink=1, head_codebooks=True, outliers=0.01).label == "pq-d2x8b-1%-heads-sink1"
    assert make_method("pq", fisher=True).needs_fisher and not make_method("pq").needs_fisher
    method = make_method("pq", fisher=True, head_codebooks=True, rope_pairs=True, sink=1)
    assert method_from_config(method.config()) == method


def test_pq_fisher_weighting_pulls_centroids():
    errs = heavy_cluster_errors("pq", bits=3, subspaces=4)
    assert errs[True] < 0.8 * errs[False]
    # without Fisher information in the calibration, fisher=True is plain k-means
    m1, s1 = fitted("pq", calibration(fisher=False), bits=4, fisher=True)
    m2, s2 = fitted("pq", calibration(fisher=False), bits=4)
    torch.testing.assert_close(s1["key_codebook"], s2["key_codebook"])


def test_pq_head_codebooks_shapes_bits_and_error():
    """Heads with different distributions: per-head codebooks (H times the state) fit each better."""
    calib = calibration()
    calib.keys[:, 1] = calib.keys[:, 1] * 5 + 2  # head 1 lives elsewhere
    x = as_bhtd(correlated(256, 7))
    x[:, 1] = x[:, 1] * 5 + 2
    shared, s_state = fitted("pq", calib, bits=4, subspaces=8)
    per_head, h_state = fitted("pq", calib, bits=4, subspaces=8, head_codebooks=True)
    assert h_state["key_codebook"].shape == (H, 8, 16, D // 8)
    assert per_head.state_bits(h_state) == per_head.state_bits_estimate(H, D) == H * shared.state_bits(s_state)
    assert per_head.bits_per_token(H, D) == shared.bits_per_token(H, D)
    enc = per_head.encode_keys(x, h_state)
    assert enc["codes"].shape == (1, H, 256, 8) and per_head.encoded_bits(enc) == H * 256 * 8 * 4
    err_h = rel_err(x, per_head.decode_keys(enc, h_state))
    err_s = rel_err(x, shared.decode_keys(shared.encode_keys(x, s_state), s_state))
    assert err_h < 0.9 * err_s
    # each head's codes index its own codebook: head 0 of x alone, as a one-head cache, decodes the same
    one = {k: v[:1] for k, v in h_state.items()}
    enc0 = per_head.encode_keys(x[:, :1], one)
    torch.testing.assert_close(enc0["codes"], enc["codes"][:, :1])
    torch.testing.assert_close(per_head.decode_keys(enc0, one), per_head.decode_keys(enc, h_state)[:, :1])
    with pytest.raises(KvqError, match="does not fit"):
        per_head.encode_keys(x.repeat(1, 2, 1, 1), h_state)  # 2H heads for H codebooks


def test_pq_rope_pairs_groups_rotating_channels():
    """Keys whose channel i and i + D/2 are one rotating pair (a 2-D point on a circle, as RoPE makes them):
    2-dim subspaces over the pairs code each circle jointly and beat contiguous subspaces."""
    g = torch.Generator().manual_seed(4)

    def rotated(n):
        radius = torch.rand(n, H, D // 2, generator=g) * 0.2 + 1.0
        angle = torch.rand(n, H, D // 2, generator=g) * 2 * math.pi
        return torch.cat([radius * angle.cos(), radius * angle.sin()], -1)  # (n, H, D): pairs (i, i + D/2)

    calib = LayerCalibration(rotated(N_CALIB), rotated(N_CALIB), tokens=N_CALIB)
    x = as_bhtd(rotated(512))
    plain, p_state = fitted("pq", calib, bits=4)
    pairs, r_state = fitted("pq", calib, bits=4, rope_pairs=True)
    err_p = rel_err(x, plain.decode_keys(plain.encode_keys(x, p_state), p_state))
    err_r = rel_err(x, pairs.decode_keys(pairs.encode_keys(x, r_state), r_state))
    assert err_r < 0.7 * err_p
    # values keep contiguous subspaces: the same codebooks as without rope_pairs
    torch.testing.assert_close(r_state["value_codebook"], p_state["value_codebook"])


@pytest.mark.parametrize("opts", [{"head_codebooks": True}, {"rope_pairs": True},
                                  {"head_codebooks": True, "rope_pairs": True, "subspaces": 4}])
def test_pq_options_lookup_scores_match_dense_scores_gqa(opts):
    method, state = fitted("pq", bits=5, **opts)
    keys = as_bhtd(correlated(40, 11)).repeat(2, 1, 1, 1)  # (B=2, H, Tk=40, D)
    enc = method.encode_keys(keys, state)
    q = torch.randn(2, 2 * H, 7, D, generator=torch.Generator().manual_seed(12))  # Hq = 2H
    scores = method.lookup_scores(q, enc, state)
    dense = q @ method.decode_keys(enc, state).repeat_interleave(2, dim=1).transpose(-1, -2)
    torch.testing.assert_close(scores, dense, rtol=1e-4, atol=1e-4)


def test_pq_outliers_bits_and_error():
    x = as_bhtd(correlated(10, 9)).repeat(2, 1, 1, 1)  # (B=2, H, T=10, D)
    method, state, enc_k, out = _check_outliers(x, "pq", 2 * H * 10 * 8 * 5, bits=5, subspaces=8)
    assert method.label == "pq-m8x5b-10%"
    q = torch.randn(2, 2 * H, 3, D, generator=torch.Generator().manual_seed(1))
    dense = q @ out.repeat_interleave(2, dim=1).transpose(-1, -2)
    torch.testing.assert_close(method.lookup_scores(q, enc_k, state), dense, rtol=1e-4, atol=1e-4)
    with pytest.raises(KvqError, match="outliers"):
        make_method("pq", outliers=0.5)


def test_cq_max_samples():
    with pytest.raises(KvqError, match="max.samples"):
        make_method("cq", max_samples=0)
    small, s_state = fitted("cq", bits=4, channels=4, max_samples=64)
    full, f_state = fitted("cq", bits=4, channels=4)
    assert not torch.equal(s_state["key_codebook"], f_state["key_codebook"])
    assert round_trip(full, f_state, TEST) < round_trip(small, s_state, TEST)


def test_pq_options_evaluate_on_tiny_model():
    model = tiny_model("llama")
    method = make_method("pq", bits=4, residual=0, sink=1, fisher=True, head_codebooks=True, rope_pairs=True,
                         kmeans_iters=10)
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(5))
    stats = capture(model, ids, method, max_tokens=64)
    assert stats[0].key_fisher is not None
    states = [method.fit(s) for s in stats]
    assert states[0]["key_codebook"].dim() == 4
    windows = torch.randint(0, 320, (2, 32), generator=torch.Generator().manual_seed(6))
    base, row = evaluate(model, windows, [Configuration(method.label, method, states)])
    assert math.isfinite(row["perplexity"]) and row["kl_divergence"] > 0
