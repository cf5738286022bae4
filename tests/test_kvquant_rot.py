"""``kvquant-rot``: kvquant's calibrated codebooks in turbo's rotated space: the rotation, round trips against plain
kvquant, spec parsing, bit accounting, calibrate -> artifact -> reload -> eval, and the runtime's refusal."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from kvq_cli import artifact
from kvq_cli.cli import app
from kvq_cli.errors import KvqError
from kvq_cli.methods import LayerCalibration, make_method, parse_spec
from kvq_cli.methods.turbo import rotation


def _outlier_channels(n: int, heads: int, dim: int, seed: int) -> torch.Tensor:
    """``(n, heads, dim)`` Student-t(5) entries, a few channels 10-30x larger: the outlier channels of real K/V."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.ones(dim)
    scale[torch.randperm(dim, generator=g)[:3]] = torch.tensor([10.0, 20.0, 30.0])
    z = torch.randn(n, heads, dim, generator=g)
    chi2 = torch.randn(5, n, heads, dim, generator=g).square().sum(0)
    return z / (chi2 / 5).sqrt() * scale  # Student-t(5), from the seeded generator only


def _calibration(seed: int = 0) -> LayerCalibration:
    keys, values = _outlier_channels(1024, 2, 64, seed), _outlier_channels(1024, 2, 64, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    return LayerCalibration(keys=keys, values=values, key_fisher=torch.rand(keys.shape, generator=g),
                            value_fisher=torch.rand(values.shape, generator=g))


def test_rotation_is_exactly_orthogonal_and_round_trips():
    q = rotation(64, 0)
    assert torch.equal(q @ q.T, torch.eye(64))  # +-1/8 entries: every product and sum is exact in float32
    m = make_method("kvquant-rot")
    x = torch.randn(1, 2, 5, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m._unrotate(m._rotate(x, True), True), x, rtol=0, atol=1e-5)
    assert torch.equal(m._rotate(x, True), x @ rotation(64, m.seed).T)  # turbo's matrix, not a copy


@pytest.mark.parametrize("outliers", [0.0, 0.01])
@pytest.mark.parametrize("bits", [2, 3])
def test_round_trip_error_below_plain_kvquant_with_outlier_channels(bits, outliers):
    calib, test = _calibration(0), _calibration(10)
    k, v = (t.transpose(0, 1)[None] for t in (test.keys, test.values))  # (1, H, T, D)
    errors = {}
    for name in ("kvquant", "kvquant-rot"):
        m = make_method(name, bits=bits, outliers=outliers, kmeans_iters=10)
        state = m.fit(calib)
        enc = m.encode_values(v, state)
        assert enc["codes"].dtype == torch.uint8 and int(enc["codes"].max()) < 1 << bits
        rel = lambda a, b: float((a - b).square().sum() / b.square().sum())  # noqa: E731
        errors[name] = (rel(m.fake_quant_keys(k, state), k), rel(m.fake_quant_values(v, state), v))
    (pk, pv), (rk, rv) = errors["kvquant"], errors["kvquant-rot"]
    assert rv < 0.8 * pv  # the rotation spreads the outlier channels a per-vector range would be set by
    if not outliers:  # heavy tails set per-channel key ranges; with 1% sparse outliers the keys are about even
        assert rk < 0.5 * pk


def test_spec_parsing_label_and_refusals():
    m = parse_spec("kvquant-rot2:outliers=1%")
    assert (m.name, m.bits, m.outliers, m.label) == ("kvquant-rot", 2, 0.01, "kvquant-rot-2b-1%")
    assert parse_spec("kvquant-rot:bits=3,rotate_keys=false").label == "kvquant-rot-3b-values-only"
    assert parse_spec("kvquant-rot:bits=3,rotate-values=no").label == "kvquant-rot-3b-keys-only"
    assert make_method("kvquant-rot").needs_calibration and make_method("kvquant-rot").keys_pre_rope
    with pytest.raises(KvqError, match="both false"):
        parse_spec("kvquant-rot:rotate_keys=0,rotate_values=0")
    with pytest.raises(KvqError, match="supports bits"):
        parse_spec("kvquant-rot5")
    with pytest.raises(KvqError, match="power of two"):
        make_method("kvquant-rot").bits_per_token(2, 96)


def test_bits_are_kvquants_and_match_the_encoding():
    """The rotation stores nothing: per token exactly kvquant's codes, value scale/zero and outliers."""
    for spec in ("kvquant-rot2", "kvquant-rot:bits=3,outliers=1%", "kvquant-rot:bits=4,per_channel=false"):
        m = parse_spec(spec)
        plain = make_method("kvquant", **{k: v for k, v in m.config().items()
                                          if k not in ("method", "rotate_keys", "rotate_values")})
        assert m.bits_per_token(2, 64) == plain.bits_per_token(2, 64)
        assert m.state_bits_estimate(2, 64) == plain.state_bits_estimate(2, 64)
    m = make_method("kvquant-rot", bits=3)
    calib = _calibration(0)
    state = m.fit(calib)
    assert {k: tuple(t.shape) for k, t in state.items()} == m.state_shapes(2, 64) and m.check_state(state) is None
    k, v = (t.transpose(0, 1)[None, :, :100] for t in (calib.keys, calib.values))  # (1, 2, 100, 64)
    got = m.encoded_bits(m.encode_keys(k, state), True) + m.encoded_bits(m.encode_values(v, state), False)
    assert got == pytest.approx(100 * m.bits_per_token(2, 64))


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_calibrate_artifact_reload_eval_and_runtime_refusal(tiny_model_dir, tiny_text_file, tmp_path):
    art = tmp_path / "rot.safetensors"
    res = _cli("calibrate", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--samples", 2, "--seqlen", 48,
               "--method", "kvquant-rot", "--bits", 2, "--outliers", 0.01, "--out", art, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["name"] == "kvquant-rot-2b-1%"
    loaded = artifact.load(art)
    assert loaded.method == make_method("kvquant-rot", bits=2, outliers=0.01)
    assert len(loaded.states) == 2 and set(loaded.states[0]) == {"key_lo", "key_hi", "key_codebook", "value_codebook"}
    res = _cli("eval-ppl", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--seqlen", 64, "--max-windows", 1,
               "--artifact", art, "--json")
    assert res.exit_code == 0, res.output
    base, row = json.loads(res.stdout)["results"]
    assert row["name"] == "kvquant-rot-2b-1%" and row["kl_divergence"] > 0 and 2 < row["avg_bits"] < 8
    # the packed runtime cache and its kernels do not rotate: refused before generation, one line, exit 2
    res = _cli("generate", "--model", tiny_model_dir, "--artifact", art, "--prompt-file", tiny_text_file,
               "--context", 40, "--max-new-tokens", 2)
    assert res.exit_code == 2, res.output
    assert "runtime cache supports" in res.output and "not kvquant-rot" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


def test_avg_bits_chooses_rotated_widths_per_layer(tiny_model_dir, tiny_text_file, tmp_path):
    """``--avg-bits`` with kvquant-rot: widths per layer fitted in the rotated space, recorded, reloaded, evaluated."""
    art = tmp_path / "rot-mix.safetensors"
    res = _cli("calibrate", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--samples", 2, "--seqlen", 48,
               "--method", "kvquant-rot:kmeans_iters=5", "--outliers", 0.01, "--avg-bits", 5.0, "--out", art, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    alloc = info["calibration"]["allocation"]
    assert info["name"].startswith("kvquant-rot-mix") and alloc["avg_bits"] <= 5.0
    assert info["avg_bits"] == pytest.approx(alloc["avg_bits"])
    loaded = artifact.load(art)
    assert loaded.method.name == "kvquant-rot" and loaded.method.rotate_keys and loaded.method.rotate_values
    assert [list(w) for w in loaded.method.widths()] == alloc["widths"]
    res = _cli("eval-ppl", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--seqlen", 48, "--max-windows", 1,
               "--artifact", art, "--json")
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["results"][1]
    assert row["name"] == info["name"] and row["avg_bits"] == pytest.approx(alloc["avg_bits"])
    res = _cli("calibrate", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--seqlen", 48, "--out",
               tmp_path / "r.safetensors", "--method", "kvquant-rot", "--avg-bits", 1.5)
    assert res.exit_code == 2 and "below what kvquant-rot" in res.output, res.output
