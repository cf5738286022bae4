"""kvquant with mixed widths (``value_bits``, ``layer_bits``, ``kvq calibrate --avg-bits``, ``--outliers auto``),
its fp16 recent window."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_model
from test_cli import run

from kvq_cli import artifact as artifact_io
from kvq_cli import load_cache
from kvq_cli.accounting import avg_bits, layer_bits
from kvq_cli.calibration.allocate import (
    OUTLIER_FRACTIONS,
    WIDTHS,
    _best_by_total,
    allocate,
    allocate_with_outliers,
    error_curves,
    head_error_curves,
    least_avg_bits,
)
from kvq_cli.calibration.capture import capture, capture_each
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


def test_head_error_curves_sum_to_the_layer_curves(calibrated):
    """The per-KV-head errors (``bench/per_head_widths.py``) come from the same fits as the allocation's: summed over
    the heads they are its curves, and no head's error is negative."""
    model, method, errors, _ = calibrated
    stats = capture(model, _ids(2, 64, seed=3), method)
    heads = head_error_curves(method, stats)
    assert heads.shape == (errors.shape[0], 2, model.config.num_key_value_heads, len(WIDTHS))
    assert (heads >= 0).all() and torch.allclose(heads.sum(dim=2), errors, rtol=1e-9, atol=0)


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


# --- --outliers auto: the outlier fraction searched under the budget (issue 21) ------------------------------------
def test_capture_each_thresholds_are_each_fractions_own():
    """One capture for several outlier fractions gives each exactly the thresholds its own capture would, and the
    same samples (shared tensors)."""
    model = tiny_model("llama")
    ids = _ids(2, 128, seed=4)
    each = [make_method("kvquant", bits=2, outliers=f, sink=0, kmeans_iters=5) for f in (0.0, 0.005, 0.01, 0.05)]
    together = capture_each(model, ids, each)
    for m, stats in zip(each, together, strict=True):
        alone = capture(model, ids, m)
        for a, b in zip(alone, stats, strict=True):
            assert torch.equal(a.key_lo, b.key_lo) and torch.equal(a.key_hi, b.key_hi) and a.tokens == b.tokens
            assert torch.equal(a.keys, b.keys) and torch.equal(a.value_fisher, b.value_fisher)
    assert together[0][0].keys is together[3][0].keys  # shared, not copied
    assert (together[3][0].key_hi < together[0][0].key_hi).any()  # 5% sets more aside than none
    with pytest.raises(ValueError, match="more than their outlier fraction"):
        capture_each(model, ids, [each[0], make_method("kvquant", bits=3)])


@pytest.fixture(scope="module")
def searched():
    """A tiny llama, kvquant (Fisher-weighted) captured once for every fraction of OUTLIER_FRACTIONS."""
    model = tiny_model("llama")
    method = make_method("kvquant", bits=4, sink=0, kmeans_iters=5)
    each = [make_method("kvquant", **{**method.config(), "outliers": f} | {"method": None}) for f in OUTLIER_FRACTIONS]
    return model, method, each, capture_each(model, _ids(2, 64, seed=3), each)


def test_outlier_search_keeps_the_least_error_within_budget(searched):
    model, method, each, stats_each = searched
    geom = geometry_from_config(model.config)
    least = {m.outliers: least_avg_bits(m, geom, 64) for m in each}
    assert least[0.0] < least[0.005] <= least[0.01]  # outliers cost bits
    curves_each = [error_curves(m, stats) for m, stats in zip(each, stats_each, strict=True)]
    wins = []
    for budget in ((least[0.0] + least[0.005]) / 2, 5.0, 6.5):
        m, states, record = allocate_with_outliers(method, stats_each, geom, 64, budget)
        direct = {}  # allocate at each fraction, called directly
        for cand, curves in zip(each, curves_each, strict=True):
            try:
                direct[cand.outliers] = allocate(cand, *curves, geom, 64, budget)
            except KvqError:
                direct[cand.outliers] = None
        assert list(record["outlier_search"]) == ["0", "0.005", "0.01"]  # every fraction tried
        assert record["outlier_search"] == {f"{f:g}": d and d[2]["error"] for f, d in direct.items()}
        win = min((d[2]["error"], f) for f, d in direct.items() if d is not None)[1]
        assert record["outliers"] == win == m.outliers and record["error"] == direct[win][2]["error"]
        assert m == direct[win][0] and record["avg_bits"] <= budget
        wins.append(win)
        assert all(torch.equal(a[k], b[k]) for a, b in zip(states, direct[win][1], strict=True) for k in a)
        if budget < least[0.005]:
            assert record["outlier_search"]["0.005"] is None and win == 0.0  # only 0 holds within the budget
    assert wins[0] == 0.0 and wins[-1] > 0  # a wide budget buys outliers: less error than more code bits
    with pytest.raises(KvqError, match="at any outlier fraction"):
        allocate_with_outliers(method, stats_each, geom, 64, least[0.0] - 0.01)


def test_cli_outliers_auto(tiny_model_dir, tiny_text_file, tmp_path):
    """``--outliers auto`` (kvquant-rot) and ``outliers=auto`` (plain kvquant): the fraction chosen is recorded with
    each fraction's error, said in the human output, and the artifact reloads at it and evaluates."""
    common = ["--model", tiny_model_dir, "--dataset", tiny_text_file, "--samples", 2, "--seqlen", 48, "--avg-bits", 5.0]
    for method, auto in [("kvquant-rot:kmeans_iters=5", ["--outliers", "auto"]),
                         ("kvquant:kmeans_iters=5,outliers=auto", [])]:
        art = tmp_path / f"{method.partition(':')[0]}.safetensors"
        res = run("calibrate", *common, "--method", method, *auto, "--out", art, "--json")
        assert res.exit_code == 0, res.output
        info = json.loads(res.stdout)
        alloc = info["calibration"]["allocation"]
        tried = alloc["outlier_search"]
        assert list(tried) == [f"{f:g}" for f in OUTLIER_FRACTIONS] and alloc["avg_bits"] <= 5.0
        assert tried[f"{alloc['outliers']:g}"] == alloc["error"] == min(e for e in tried.values() if e is not None)
        loaded = artifact_io.load(art)
        assert loaded.method.outliers == alloc["outliers"] and loaded.method.label == info["name"]
        assert [list(w) for w in loaded.method.widths()] == alloc["widths"]
        res = run("eval-ppl", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--seqlen", 48,
                  "--max-windows", 1, "--artifact", art, "--json")
        assert res.exit_code == 0, res.output
        row = json.loads(res.stdout)["results"][1]
        assert row["name"] == info["name"] and row["avg_bits"] == pytest.approx(alloc["avg_bits"])
    res = run("calibrate", *common, "--method", "kvquant-rot:kmeans_iters=5", "--outliers", "auto",
              "--out", tmp_path / "h.safetensors")
    assert res.exit_code == 0 and "outlier fraction" in res.output and "the least error" in res.output, res.output


@pytest.mark.parametrize("args, message", [
    (["--outliers", "auto"], "give --avg-bits too"),
    (["--method", "kvquant-rot:outliers=auto"], "give --avg-bits too"),
    (["--method", "int", "--outliers", "auto", "--avg-bits", 3], "does not take --outliers"),
    (["--method", "cq:outliers=auto", "--avg-bits", 3], "does not take it"),
    (["--outliers", "many", "--avg-bits", 3], "--outliers is a fraction"),
    (["--method", "kvquant:outliers=auto,outliers=1%", "--avg-bits", 3], "given twice"),
])
def test_outliers_auto_refusals(args, message, tmp_path):
    """Said from the options alone, in one line, exit 2, before any model or corpus is read."""
    res = run("calibrate", "--model", tmp_path / "no-model", "--dataset", tmp_path / "no.txt", "--out",
              tmp_path / "x.safetensors", *args)
    assert res.exit_code == 2 and message in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_outliers_auto_help_and_other_commands():
    """calibrate's --help names the fractions tried (``OUTLIER_FRACTIONS``); eval-ppl takes no auto."""
    fractions = ", ".join(f"{f * 100:g}%" if f else "0" for f in OUTLIER_FRACTIONS[:-1])
    text = " ".join(run("calibrate", "--help").output.split())
    assert f"try {fractions} and {OUTLIER_FRACTIONS[-1] * 100:g}%" in text
    res = run("eval-ppl", "--method", "kvquant:outliers=auto", "--model", "random:llama-3.2-1b")
    assert res.exit_code == 2 and "is a number" in res.output, res.output


def test_outliers_auto_refusal_imports_no_torch(tmp_path):
    """Start-up (issue 20): the refusal of ``--outliers auto`` without ``--avg-bits`` imports neither torch nor
    transformers."""
    out = str(tmp_path / "x.safetensors")
    script = ("import json, sys; from typer.testing import CliRunner; from kvq_cli.cli import app; "
              f"res = CliRunner().invoke(app, ['calibrate', '--outliers', 'auto', '--out', {out!r}]); "
              "assert res.exit_code == 2 and 'give --avg-bits' in res.output, res.output; "
              "print(json.dumps([m for m in ('torch', 'transformers') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == []
