"""kvquant with mixed widths (``value_bits``, ``layer_bits``, ``kvq calibrate --avg-bits``), its fp16 recent window."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from conftest import tiny_model
from test_cli import run

from kvq_cli import artifact as artifact_io
from kvq_cli import load_cache
from kvq_cli.accounting import avg_bits, layer_bits
from kvq_cli.calibration.allocate import WIDTHS, _best_by_total, allocate, error_curves
from kvq_cli.calibration.capture import capture
from kvq_cli.errors import KvqError
from kvq_cli.hf_attention import cache_kwargs, geometry_from_config
from kvq_cli.methods import make_method, method_from_config, parse_spec
from kvq_cli.runtime.kernel_path import kvquant_refusal
from kvq_cli.runtime.stream import streaming_logits
from kvq_cli.simulate import simulated


def _ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 320, (b, t), generator=torch.Generator().manual_seed(seed))


def test_layer_bits_configuration():
    m = parse_spec("kvquant:bits=4,layer_bits=32-14,outliers=1%")
    assert m.label == "kvquant-mix2.5b-1%" and method_from_config(m.config()) == m
    assert [(x.bits, x.stream_bits(True), x.stream_bits(False)) for x in map(m.for_layer, (0, 1))] == [(3, 3, 2),
                                                                                                   (1, 1, 4)]
    assert m.for_layer(0).label == "kvquant-k3v2b-1%" and make_method("kvquant", bits=3, residual=64).label == \
        "kvquant-3b-r64"
    for bad, why in [({"bits": 3, "layer_bits": "32-14"}, "widest"), ({"layer_bits": "35"}, "two digits"),
                     ({"layer_bits": "3-2"}, "two digits"), ({"bits": 3, "value_bits": 5}, "value_bits")]:
        with pytest.raises(KvqError, match=why):
            make_method("kvquant", **bad)
    with pytest.raises(KvqError, match="layer_bits gives 2 layers"):
        m.for_layer(2)


def test_mixed_widths_bit_accounting():
    H, D = 3, 64
    m = make_method("kvquant", bits=4, layer_bits="32-14-44", outliers=0.01)
    per_layer = [m.for_layer(i) for i in range(3)]
    # bits per token: the values' width counts for the values, the keys' for the keys
    k3v2 = per_layer[0]
    assert k3v2.bits_per_token(H, D) == pytest.approx(make_method("kvquant", bits=3, outliers=0.01).bits_per_token(H, D)
                                                      - H * D)
    assert k3v2.state_bits_estimate(H, D) == 16 * (8 + 4 + 2 * H * D)
    # the whole-model accounting is the sum of the layers'
    geom = geometry_from_config(tiny_model("llama", num_hidden_layers=3, hidden_size=192, num_attention_heads=3,
                                           num_key_value_heads=3).config)
    assert (geom.kv_heads, geom.head_dim) == (H, D)
    states = sum(x.state_bits_estimate(H, D) for x in per_layer)
    total = sum(layer_bits(x, H, D, 2048, 0) for x in per_layer) + states
    assert avg_bits(m, geom, 2048, states) * 3 * 2 * H * D * 2048 == pytest.approx(total, rel=1e-12)
    # exact count of a value encoding at its own width
    calib_keys = torch.randn(512, H, D)
    from kvq_cli.methods.base import LayerCalibration

    state = k3v2.fit(LayerCalibration(calib_keys, torch.randn(512, H, D), torch.rand(512, H, D),
                                      torch.rand(512, H, D)))
    assert state["key_codebook"].shape == (8,) and state["value_codebook"].shape == (4,)
    v = torch.randn(1, H, 100, D)
    enc = k3v2.encode_values(v, state)
    assert int(enc["codes"].max()) < 4
    exact = k3v2.encoded_bits(enc, is_key=False)
    assert exact == 100 * (H * D * 2 + 32 * H) + 32 * int(enc["outlier_mask"].sum())


def test_dynamic_program_is_optimal():
    g = torch.Generator().manual_seed(0)
    errors = torch.rand(2, 2, 4, generator=g, dtype=torch.float64).sort(-1, descending=True).values
    best = _best_by_total(errors)
    for total in range(4, 17):
        brute = min(sum(errors.reshape(4, 4)[s, WIDTHS.index(b)].item() for s, b in enumerate(picks))
                    for picks in itertools.product(WIDTHS, repeat=4) if sum(picks) == total)
        assert best[total][0] == pytest.approx(brute) and sum(best[total][1]) == total


@pytest.fixture(scope="module")
def calibrated():
    """A tiny llama (head_dim 16), kvquant-1% with Fisher information, its error curves and fits at 1-4 bits."""
    model = tiny_model("llama")
    method = make_method("kvquant", bits=4, outliers=0.01, sink=0, kmeans_iters=8)
    stats = capture(model, _ids(2, 64, seed=3), method)
    errors, fits = error_curves(method, stats)
    return model, method, errors, fits


def test_avg_bits_allocation_within_budget(calibrated):
    model, method, errors, fits = calibrated
    assert (errors[:, :, 0] > errors[:, :, 3]).all()  # 1 bit errs more than 4 bits on every stream
    geom = geometry_from_config(model.config)
    results = []
    for budget in (4.0, 4.5, 5.5, 8.0):
        m, states, record = allocate(method, errors, fits, geom, 64, budget)
        state_bits = sum(m.for_layer(i).state_bits(s) for i, s in enumerate(states))
        assert record["avg_bits"] == avg_bits(m, geom, 64, state_bits, with_residual=True) <= budget
        assert record["widths"] == [list(w) for w in m.widths()] and len(record["widths"]) == 2
        results.append((record["avg_bits"], record["error"]))
    assert [e for _, e in results] == sorted((e for _, e in results), reverse=True)  # more bits, less error
    assert m.layer_bits == "44-44"  # a budget beyond 4-bit everywhere takes 4 bits everywhere
    with pytest.raises(KvqError, match="below what kvquant can hold"):
        allocate(method, errors, fits, geom, 64, 3.0)


def test_mixed_widths_simulated_equals_stored_and_artifact_round_trip(calibrated, tmp_path):
    model, method, errors, fits = calibrated
    geom = geometry_from_config(model.config)
    m, states, record = allocate(method, errors, fits, geom, 64, 5.0)
    m = make_method("kvquant", **{**m.config(), "layer_bits": "42-13", "bits": 4} | {"method": None})
    states = [{**fits[0][4], "value_codebook": fits[0][2]["value_codebook"]},
              {**fits[1][1], "value_codebook": fits[1][3]["value_codebook"]}]
    ids = _ids(2, 40, seed=5)
    with torch.no_grad(), simulated(model, m, states):
        sim = model(ids).logits
    stream = streaming_logits(model, ids, m, states, chunk=9, full_chunk=False)
    torch.testing.assert_close(stream, sim, rtol=0, atol=1e-4)
    # the runtime packs each layer's codes at their own widths; the kernel path says why it leaves such a layer alone
    cache = load_cache((m, states), model, max_tokens=48)
    try:
        with torch.no_grad():
            model(ids[:1], **cache_kwargs(model, cache), use_cache=True)
    finally:
        cache.unbind()
    lay = cache.layers[0]
    assert lay.values_stream.packed.fields["codes"].buf.shape[-1] == 16 * 2 // 8  # 2-bit values of head_dim 16
    assert lay.keys_stream.packed.fields["codes"].buf.shape[-1] == 16 * 4 // 8
    assert "4-bit keys and 2-bit values" in kvquant_refusal(lay)
    # artifacts keep the widths, and their checks read each layer's shapes
    art = artifact_io.Artifact(m, states, artifact_io.fingerprint(geom), {"allocation": record})
    path = artifact_io.save(art, tmp_path / "mix.safetensors")
    back = artifact_io.load(path, geom)
    assert back.method == m and torch.equal(back.states[1]["key_codebook"], states[1]["key_codebook"])
    three = make_method("kvquant", **{**m.config(), "layer_bits": "42-13-11"} | {"method": None})
    with pytest.raises(KvqError, match="layer_bits gives 3 layers for a model of 2"):
        artifact_io.save(artifact_io.Artifact(three, states, artifact_io.fingerprint(geom)), tmp_path / "x.safetensors")
        artifact_io.load(tmp_path / "x.safetensors", geom)


def test_kvquant_recent_window_is_fp16_and_counted(calibrated):
    """kvquant with ``residual``: the newest tokens stay fp16 exactly in streaming and generation, the history is
    the method's encoding, and the accounting counts the window."""
    model, method, errors, fits = calibrated
    m = make_method("kvquant", **{**method.config(), "bits": 3, "residual": 16} | {"method": None})
    states = [fits[0][3], fits[1][3]]
    ids = _ids(1, 45, seed=7)
    cache = load_cache((m, states), model)
    try:
        with torch.no_grad():
            model(ids, **cache_kwargs(model, cache), use_cache=True)
    finally:
        cache.unbind()
    from transformers import DynamicCache

    plain = DynamicCache()
    with torch.no_grad():
        model(ids, **cache_kwargs(model, plain), use_cache=True)
    v = plain.layers[0].values  # (1, H, 45, D)
    lay = cache.layers[0]
    assert lay.values_stream.residual.n == lay.keys_stream.residual.n == 16 and lay.values_stream.packed.n == 29
    _, rv = lay.read(29, 45)
    assert torch.equal(rv, v[:, :, 29:].half().float())
    _, hv = lay.read(0, 29)
    assert torch.equal(hv, m.fake_quant_values(v[:, :, :29], lay.state()))
    geom = geometry_from_config(model.config)
    state_bits = sum(m.state_bits(s) for s in states)
    with_window = avg_bits(m, geom, 45, state_bits, with_residual=True)
    without = avg_bits(m, geom, 45, state_bits, with_residual=False)
    # the cache's bytes (key outliers: as many as the data has, the accounting charges the nominal 1%) are the
    # accounting's with the window, not without it
    assert with_window > without + 2 and cache.avg_bits() == pytest.approx(with_window, rel=0.05)
    assert abs(cache.avg_bits() - with_window) < abs(cache.avg_bits() - without) / 4


def test_cli_avg_bits(tiny_model_dir, tiny_text_file, tmp_path):
    art = tmp_path / "mix.safetensors"
    res = run("calibrate", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--samples", 2, "--seqlen", 48,
              "--method", "kvquant:kmeans_iters=5", "--outliers", 0.01, "--avg-bits", 5.0, "--out", art, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    alloc = info["calibration"]["allocation"]
    assert info["avg_bits"] == pytest.approx(alloc["avg_bits"]) and alloc["avg_bits"] <= 5.0
    assert info["name"].startswith("kvquant-mix") and len(alloc["widths"]) == 2
    res = run("eval-ppl", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--seqlen", 48, "--max-windows", 1,
              "--artifact", art, "--json")
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["results"][1]
    assert row["name"] == info["name"] and row["avg_bits"] == pytest.approx(alloc["avg_bits"])  # one count
    for extra, message in [(["--method", "int", "--avg-bits", 3], "does not take it"),
                           (["--method", "turbo", "--avg-bits", 3], "does not take it"),
                           (["--method", "kvquant", "--avg-bits", 1.5], "below what kvquant"),
                           (["--method", "kvquant", "--avg-bits", "nan"], "in [1, 16]")]:
        res = run("calibrate", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--seqlen", 48, "--out",
                  tmp_path / "r.safetensors", *extra)
        assert res.exit_code == 2 and message in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
