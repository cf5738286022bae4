"""Every registered method: round trips, exact bit counts, analytic bits per token, outliers, validation."""

from __future__ import annotations

import math

import pytest
import torch

from kvq_cli.calibration import weighted_kmeans
from kvq_cli.errors import KvqError
from kvq_cli.methods import LayerCalibration, available, get_method_class, make_method, method_from_config
from kvq_cli.methods.base import KVMethod
from kvq_cli.methods.quant_ops import channel_thresholds, nearest_code, normal_float_codebook, q_norm

H, D = 2, 64
N_CALIB = 1024
CHANNEL_SCALE = torch.exp(torch.randn(H, 1, D, generator=torch.Generator().manual_seed(0)))  # (H, 1, D)


def heavy(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Student-t(5) samples: heavy tails, like real K/V activations."""
    torch.manual_seed(seed)
    return torch.distributions.StudentT(torch.tensor(5.0)).sample(shape)


def make_keys(B: int, T: int, seed: int) -> torch.Tensor:
    """``(B, H, T, D)`` keys with outlier channels (per-channel scale and offset)."""
    return heavy((B, H, T, D), seed) * CHANNEL_SCALE + 0.5 * CHANNEL_SCALE


def make_calibration(fraction: float) -> LayerCalibration:
    keys = make_keys(1, N_CALIB, seed=1)[0].transpose(0, 1)  # (N, H, D)
    values = heavy((N_CALIB, H, D), seed=2)
    lo, hi = channel_thresholds(keys, fraction)
    g = torch.Generator().manual_seed(3)
    fisher = [torch.rand(N_CALIB, H, D, generator=g) + 0.01 for _ in range(2)]
    return LayerCalibration(keys, values, fisher[0], fisher[1], lo, hi, tokens=N_CALIB)


def build(name: str, **opts) -> tuple[KVMethod, dict]:
    method = make_method(name, **opts)
    state = method.fit(make_calibration(method.key_outlier_fraction)) if method.needs_calibration else {}
    return method, state


CASES = [(name, {"bits": b}) for name in available() for b in get_method_class(name).supported_bits]
CASES += [
    ("kvquant", {"bits": 3, "outliers": 0.01}),
    ("kvquant", {"bits": 2, "outliers": 0.01, "per_channel": False}),
    ("kvquant", {"bits": 3, "pre_rope": False, "nuq": False}),
    ("kvquant", {"bits": 3, "fisher": False, "qnorm": False}),
    ("kivi", {"bits": 2, "group": 24}),
]
IDS = [f"{n}-{'-'.join(f'{k}={v}' for k, v in o.items())}" for n, o in CASES]


@pytest.mark.parametrize(("name", "opts"), CASES, ids=IDS)
def test_round_trip_and_bits(name: str, opts: dict) -> None:
    method, state = build(name, **opts)
    k, v = make_keys(2, 256, seed=4), heavy((2, H, 256, D), seed=5)
    enc_k, enc_v = method.encode_keys(k, state), method.encode_values(v, state)
    for x, enc, dec in ((k, enc_k, method.decode_keys), (v, enc_v, method.decode_values)):
        out = dec(enc, state)
        assert out.shape == x.shape and out.dtype == torch.float32
        assert "codes" not in enc or enc["codes"].dtype == torch.uint8
        assert torch.isfinite(out).all()
    assert method.fake_quant_keys(k.bfloat16(), state).dtype == torch.bfloat16
    # analytic bits per token agree with the exact count on T = 256 tokens
    per_token = (method.encoded_bits(enc_k) + method.encoded_bits(enc_v)) / (2 * 256)
    assert per_token == pytest.approx(method.bits_per_token(H, D), rel=0.02)
    assert method_from_config(method.config()) == method
    if hasattr(method, "state_bits_estimate"):
        assert method.state_bits_estimate(H, D) == method.state_bits(state)


BOUND_4BIT = {"int": 0.2, "nf": 0.2, "kivi": 0.12, "kvquant": 0.25}


@pytest.mark.parametrize("name", ["int", "nf", "kivi", "kvquant"])
def test_error_shrinks_with_bits(name: str) -> None:
    k, v = make_keys(1, 256, seed=6), heavy((1, H, 256, D), seed=7)
    errors = []
    for bits in get_method_class(name).supported_bits:
        method, state = build(name, bits=bits)
        ek = (method.fake_quant_keys(k, state) - k).norm() / k.norm()
        ev = (method.fake_quant_values(v, state) - v).norm() / v.norm()
        errors.append(max(ek.item(), ev.item()))
        if bits == 4:
            assert errors[-1] < BOUND_4BIT[name]
    assert errors == sorted(errors, reverse=True) and errors[-1] < errors[0] / 2


def test_kvquant_outliers_improve_error() -> None:
    k = make_keys(1, 256, seed=8)
    plain, s0 = build("kvquant", bits=3)
    sparse, s1 = build("kvquant", bits=3, outliers=0.01)
    assert (sparse.fake_quant_keys(k, s1) - k).norm() < 0.75 * (plain.fake_quant_keys(k, s0) - k).norm()


def test_encoded_bits_hand_count() -> None:
    B, T = 2, 70  # partial kivi token group; D = 64 with group 24: partial channel group
    k, v = make_keys(B, T, seed=9), heavy((B, H, T, D), seed=10)
    n_vec = B * H * T
    m, s = build("int", bits=3)
    assert m.encoded_bits(m.encode_keys(k, s)) == n_vec * (D * 3 + 32)
    m, s = build("nf", bits=3)
    assert m.encoded_bits(m.encode_values(v, s)) == n_vec * (D * 3 + 16)
    m, s = build("kivi", bits=2, group=24)
    assert m.encoded_bits(m.encode_keys(k, s)) == n_vec * D * 2 + 32 * B * H * math.ceil(T / 24) * D
    assert m.encoded_bits(m.encode_values(v, s)) == n_vec * D * 2 + 32 * n_vec * math.ceil(D / 24)
    m, s = build("kvquant", bits=3, outliers=0.01)
    lo, hi = s["key_lo"][None, :, None, :], s["key_hi"][None, :, None, :]
    n_key_outliers = int(((k < lo) | (k > hi)).sum())
    assert m.encoded_bits(m.encode_keys(k, s)) == n_vec * D * 3 + 32 * n_key_outliers
    n_tok = 1  # outliers per side of a token's H*D = 128 values: max(1, round(0.01 * 128 / 2))
    assert m.encoded_bits(m.encode_values(v, s)) == n_vec * (D * 3 + 32) + B * T * 2 * n_tok * 32
    m, s = build("fp16")
    assert m.encoded_bits(m.encode_keys(k, s)) == n_vec * D * 16


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_error_within_half_step(bits: int) -> None:
    method, state = build("kivi", bits=bits)
    k, v = make_keys(1, 80, seed=11), heavy((1, H, 80, D), seed=12)
    ek = method.encode_keys(k, state)
    step = ek["scale"].float().repeat_interleave(32, dim=2)[:, :, :80]  # (B, H, T, D) per-group scale
    assert ((method.decode_keys(ek, state) - k).abs() <= step / 2 * (1 + 1e-3) + 1e-6).all()
    ev = method.encode_values(v, state)
    step = ev["scale"].float().repeat_interleave(32, dim=3)  # (B, H, T, D)
    assert ((method.decode_values(ev, state) - v).abs() <= step / 2 * (1 + 1e-3) + 1e-6).all()


@pytest.mark.parametrize(("fraction", "n"), [(0.01, 1), (0.1, 6)])
def test_kvquant_value_outliers_are_exact_top_k(fraction: float, n: int) -> None:
    """Per token, over all KV heads: the n largest and n smallest of its H*D values (KVQuant's top-k)."""
    method, state = build("kvquant", bits=2, outliers=fraction)
    v = heavy((2, H, 50, D), seed=13)
    enc = method.encode_values(v, state)
    assert (enc["outlier_mask"].sum((1, 3)) == 2 * n).all()  # (B, T)
    rows = v.permute(0, 2, 1, 3).reshape(2, 50, H * D)  # (B, T, H*D)
    kept_rows = enc["outlier_mask"].permute(0, 2, 1, 3).reshape(2, 50, H * D)
    assert torch.equal(
        rows[kept_rows].sort().values,
        torch.cat([rows.sort(-1).values[..., :n], rows.sort(-1).values[..., -n:]], -1).flatten().sort().values,
    )
    kept = enc["outlier_mask"]
    assert torch.equal(method.decode_values(enc, state)[kept], v[kept].half().float())


def test_kvquant_key_outlier_fraction_on_fresh_data() -> None:
    method = make_method("kvquant", bits=3, outliers=0.01)
    calib = make_calibration(0.01)
    calib.keys = make_keys(1, 4096, seed=14)[0].transpose(0, 1)  # (N, H, D): thresholds from the data's quantiles
    calib.key_lo, calib.key_hi = channel_thresholds(calib.keys, 0.01)
    calib.key_fisher = calib.value_fisher = None
    method.fisher = False
    state = method.fit(calib)
    enc = method.encode_keys(make_keys(1, 4096, seed=15), state)
    assert enc["outlier_mask"].float().mean().item() == pytest.approx(0.01, rel=0.2)


def test_kvquant_keys_clipped_without_outliers() -> None:
    method, state = build("kvquant", bits=3)
    k = make_keys(1, 64, seed=16) * 3  # far beyond the calibration range
    enc = method.encode_keys(k, state)
    assert "outlier_mask" not in enc
    out = method.decode_keys(enc, state)
    assert (out >= state["key_lo"][None, :, None] - 1e-5).all() and (out <= state["key_hi"][None, :, None] + 1e-5).all()


def test_kvquant_state_and_fisher_switches() -> None:
    method, state = build("kvquant", bits=3, outliers=0.01)
    assert set(state) == {"key_lo", "key_hi", "key_codebook", "value_codebook"}
    assert state["key_lo"].shape == (H, D) and state["value_codebook"].shape == (8,)
    for cb in (state["key_codebook"], state["value_codebook"]):
        assert torch.equal(cb, cb.sort().values) and cb.abs().max() <= 1 and torch.equal(cb, cb.half().float())
    assert method.needs_fisher and method.keys_pre_rope and method.key_outlier_fraction == 0.01
    assert not make_method("kvquant", fisher=False).needs_fisher
    assert not make_method("kvquant", nuq=False).needs_fisher
    assert make_method("kvquant", per_channel=False, outliers=0.01).key_outlier_fraction == 0.0
    assert "key_lo" not in build("kvquant", per_channel=False)[1]
    calib = make_calibration(0.0)
    calib.key_fisher = calib.value_fisher = None
    make_method("kvquant", fisher=False).fit(calib)  # fine without Fisher
    with pytest.raises(KvqError):
        make_method("kvquant").fit(calib)
    weighted = build("kvquant", bits=2)[1]["value_codebook"]
    assert not torch.equal(weighted, build("kvquant", bits=2, fisher=False)[1]["value_codebook"])


def test_q_norm_matches_mean_and_std() -> None:
    g = torch.Generator().manual_seed(17)
    y = (torch.randn(20000, generator=g) * 0.3 + 0.05).clamp(-1, 1)
    w = torch.rand(20000, generator=g) + 0.1
    c = weighted_kmeans(y, 4, w)
    codes = nearest_code(y, c).long()
    c2 = q_norm(c, y, w)
    wn = w.double() / w.double().sum()

    def stats(r: torch.Tensor) -> tuple[float, float]:
        mu = (wn * r).sum()
        return mu.item(), (wn * (r - mu) ** 2).sum().sqrt().item()

    mu, sd = stats(y.double())
    mu_q, sd_q = stats(c2[codes].double())  # the calibration entries' codes, reconstructed with the new levels
    assert mu_q == pytest.approx(mu, abs=1e-4) and sd_q == pytest.approx(sd, rel=1e-4)
    assert stats(c[codes].double())[1] < 0.95 * sd  # k-means alone shrinks the spread
    assert stats(c2[nearest_code(y, c2).long()].double())[1] > stats(c[codes].double())[1]  # re-encoded: wider


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_nf_codebook(bits: int) -> None:
    cb = normal_float_codebook(bits)
    assert cb.shape == (1 << bits,) and torch.equal(cb, cb.sort().values)
    assert (cb == 0).any() and cb[0] == -1 and cb[-1] == 1
    if bits == 4:  # the published NF4 levels (QLoRA)
        nf4 = [-1, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0]
        nf4 += [0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1]
        assert torch.allclose(cb, torch.tensor(nf4), atol=2e-4)


@pytest.mark.parametrize(
    ("name", "opts"),
    [
        ("kivi", {"bits": 3}),
        ("kivi", {"group": 0}),
        ("kvquant", {"bits": 5}),
        ("kvquant", {"bits": 0}),
        ("kvquant", {"outliers": 0.2}),
        ("kvquant", {"outliers": -0.01}),
        ("kvquant", {"kmeans_iters": 0}),
        ("int", {"bits": 1}),
        ("nf", {"bits": 8}),
        ("int", {"group": 8}),
    ],
)
def test_validate_refuses(name: str, opts: dict) -> None:
    with pytest.raises(KvqError):
        make_method(name, **opts)


def test_labels() -> None:
    assert make_method("kvquant", bits=3, outliers=0.01).label == "kvquant-3b-1%"
    assert make_method("kvquant", bits=3, outliers=0.01, pre_rope=False).label == "kvquant-3b-1%-post-rope"
    assert make_method("kvquant", bits=2, nuq=False).label == "kvquant-2b-uniform"
    assert make_method("kvquant", bits=4, fisher=False, qnorm=False).label == "kvquant-4b-no-fisher-no-qnorm"
    assert make_method("kivi", bits=2).label == "kivi-2b"
    assert make_method("int", bits=4).label == "int-4b"
    assert make_method("nf", bits=3).label == "nf-3b"
    assert make_method("kivi", bits=2).residual == 128 and make_method("kvquant").sink == 1


def test_kvquant_head_codebooks_fit_each_head() -> None:
    """One codebook per KV head: (H, 2^b) state, and no worse than one shared codebook on heads that differ."""
    g = torch.Generator().manual_seed(21)
    n, h, d = 3000, 3, 32
    keys = torch.randn(n, h, d, generator=g) * torch.tensor([0.2, 1.0, 5.0])[None, :, None]
    skew = torch.randn(n, h, d, generator=g).pow(torch.tensor([1.0, 3.0, 1.0])[None, :, None].expand(n, h, d))
    values = torch.where(torch.arange(h)[None, :, None] == 1, skew, keys)  # one head heavy-tailed
    calib = LayerCalibration(keys, values, torch.ones_like(keys), torch.ones_like(values))
    errs = {}
    for per_head in (False, True):
        m = make_method("kvquant", bits=2, head_codebooks=per_head)
        state = m.fit(calib)
        assert state["value_codebook"].shape == ((h, 4) if per_head else (4,))
        assert m.state_bits(state) == m.state_bits_estimate(h, d)
        v = values[:400].transpose(0, 1)[None]  # (1, H, T, D)
        errs[per_head] = (m.fake_quant_values(v, state) - v).norm() / v.norm()
    assert errs[True] <= errs[False] * 1.001


def test_kvquant_token_scales_share_one_range_per_token() -> None:
    """token_scales: one fp16 scale/zero per token over all KV heads (KVQuant's per-token), bits counted exactly."""
    m, s = build("kvquant", bits=3, outliers=0.01, token_scales=True)
    v = heavy((2, H, 40, D), seed=31)
    enc = m.encode_values(v, s)
    assert enc["scale"].shape == (2, 1, 40, 1) and enc["zero"].shape == (2, 1, 40, 1)
    assert m.encoded_bits(enc) == 2 * H * 40 * D * 3 + 2 * 40 * 32 + int(enc["outlier_mask"].sum()) * 32
    rel = (m.fake_quant_values(v, s) - v).norm() / v.norm()
    assert rel < 0.25
    k = make_keys(2, 40, seed=32)
    per_token_bits = (m.encoded_bits(m.encode_keys(k, s)) + m.encoded_bits(enc)) / 80
    assert per_token_bits == pytest.approx(m.bits_per_token(H, D), rel=0.02)
