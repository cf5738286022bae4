"""The packed runtime cache: generation, streaming evaluation, blockwise attention, storage and refusals."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from kvq_cli import load_cache
from kvq_cli.accounting import cache_bits
from kvq_cli.calibration.capture import capture
from kvq_cli.errors import KvqError
from kvq_cli.hf_attention import attention_layers, cache_argument, cache_kwargs, geometry_from_config
from kvq_cli.methods import make_method
from kvq_cli.methods.base import outlier_pointer_bits
from kvq_cli.perplexity import Configuration, evaluate
from kvq_cli.runtime.attention import dense_attention
from kvq_cli.runtime.stream import streaming_logits
from kvq_cli.simulate import simulated


def _ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 320, (b, t), generator=torch.Generator().manual_seed(seed))


def _kvquant(model, ids, **opts):
    """A kvquant method calibrated (quickly: no Fisher, few k-means iterations) on ``ids``."""
    method = make_method("kvquant", fisher=False, kmeans_iters=5, **opts)
    return method, [method.fit(s) for s in capture(model, ids, method)]


def _feed(model, cache, ids, chunk):
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            model(ids[:, s : s + chunk], **cache_kwargs(model, cache), use_cache=True)


MODELS = [("llama", {}), ("mistral", {}), ("qwen2", {}), ("llama", {"num_key_value_heads": 1})]  # GQA x3, MQA


@pytest.mark.parametrize("arch, overrides", MODELS, ids=["llama", "mistral", "qwen2", "mqa"])
@pytest.mark.parametrize("pre_rope", [False, True])
def test_generate_16_bit_matches_plain(arch, overrides, pre_rope):
    model = tiny_model(arch, **overrides)
    ids = _ids(2, 11)
    plain = model.generate(ids, max_new_tokens=16, do_sample=False)
    cache = load_cache(make_method("fp16", pre_rope=pre_rope), model, batch_size=2)
    try:
        out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=16, do_sample=False)
    finally:
        cache.unbind()
    assert torch.equal(out, plain)
    assert cache.get_seq_length() == 11 + 15 and model.config._attn_implementation != "kvq"


def test_generate_quantized_runs_and_stays_bound_until_unbind():
    model = tiny_model("qwen2")
    cache = load_cache(make_method("kivi", bits=2, residual=8, group=8), model, max_tokens=64)
    out = model.generate(_ids(1, 20), **cache_kwargs(model, cache), max_new_tokens=12, do_sample=False)
    assert out.shape == (1, 32) and cache.get_seq_length() == 31
    assert 2 < cache.avg_bits() < 16
    cache.unbind()
    assert not any(hasattr(m, "_kvq_layer") for m in attention_layers(model))


def test_streaming_16_bit_equals_baseline():
    model = tiny_model("llama")
    wins = _ids(3, 40, seed=1)
    fp16 = Configuration("fp16", make_method("fp16"))
    base, stream = evaluate(model, wins, [fp16], batch_size=2, mode="streaming", chunk=7)
    _, sim = evaluate(model, wins, [fp16], batch_size=2)
    assert stream["perplexity"] == pytest.approx(base["perplexity"], rel=1e-3)  # fp16 rounding of K/V only
    assert stream["perplexity"] == pytest.approx(sim["perplexity"], rel=1e-5)  # float reordering only
    assert stream["kl_divergence"] == pytest.approx(sim["kl_divergence"], abs=1e-6)


@pytest.mark.parametrize("opts", [{"bits": 3}, {"bits": 2, "outliers": 0.01}, {"bits": 3, "per_channel": False},
                                  {"bits": 2, "head_codebooks": True}])
def test_streaming_matches_simulated_kvquant(opts):
    """No residual window: streaming and simulated quantize the same numbers. With ``sink=0`` the logits agree
    to 1e-4 (float reordering only); with the default fp16 sink (simulated keeps it in fp32) to argmax."""
    model = tiny_model("llama")
    ids = _ids(2, 45)
    for sink, atol in ((0, 1e-4), (1, None)):
        method, states = _kvquant(model, ids[:1], sink=sink, **opts)
        with torch.no_grad(), simulated(model, method, states):
            sim = model(ids).logits
        stream = streaming_logits(model, ids, method, states, chunk=13, full_chunk=False)
        if atol is not None:
            torch.testing.assert_close(stream, sim, rtol=0, atol=atol)
        else:
            assert (stream.argmax(-1) == sim.argmax(-1)).float().mean() > 0.97


def test_kivi_residual_is_exact_fp16_and_history_is_the_method():
    model = tiny_model("mistral")
    method = make_method("kivi", bits=2, residual=16, group=8)
    ids = _ids(1, 45)
    cache = load_cache(method, model)
    _feed(model, cache, ids, chunk=45)  # one chunk: layer 0 sees exactly the keys/values of a plain pass
    cache.unbind()
    from transformers import DynamicCache

    plain = DynamicCache()
    with torch.no_grad():
        model(ids, **cache_kwargs(model, plain), use_cache=True)
    k, v = plain.layers[0].keys, plain.layers[0].values  # (1, H, 45, D) post-RoPE
    layer = cache.layers[0]
    assert layer.values_stream.residual.n == layer.keys_stream.residual.n == 45 - 32  # whole groups, K and V alike
    rk, rv = layer.read(45 - 13, 45)
    assert torch.equal(rk, k[:, :, -13:].half().float()) and torch.equal(rv, v[:, :, -13:].half().float())
    hk, hv = layer.read(0, 32)
    assert torch.equal(hk, method.fake_quant_keys(k[:, :, :32], {}))  # groups of 8 from token 0
    assert torch.equal(hv, method.fake_quant_values(v[:, :, :32], {}))  # values per token


@pytest.mark.parametrize("name", ["kvquant", "kivi"])
@pytest.mark.parametrize("block", [5, 16, 64])
def test_blockwise_attention_equals_dense(name, block):
    model = tiny_model("llama")
    ids = _ids(2, 53)
    if name == "kvquant":
        method, states = _kvquant(model, ids[:1], bits=2, outliers=0.02, sink=3)
    else:
        method, states = make_method("kivi", bits=2, residual=6, group=4), None
    cache = load_cache((method, states), model, batch_size=2, block=block)
    _feed(model, cache, ids, chunk=20)
    cache.unbind()
    layer = cache.layers[1]
    k, v = layer.read(0, 53)  # the whole layer, dequantized: only for the reference
    q = torch.randn(2, 4, 9, 16, generator=torch.Generator().manual_seed(2))
    dense = dense_attention(q, k, v, 0.25)
    torch.testing.assert_close(layer.attend(q, 0.25), dense, rtol=1e-5, atol=1e-5)
    layer.query_tile = 4  # queries in tiles of 4 (9 = 4 + 4 + 1)
    torch.testing.assert_close(layer.attend(q, 0.25), dense, rtol=1e-5, atol=1e-5)


def test_no_full_length_dequantization():
    model = tiny_model("qwen2")
    ids = _ids(1, 70)
    method, states = _kvquant(model, ids, bits=3, outliers=0.01)
    seen = []
    for fn in ("decode_keys", "decode_values"):
        original = getattr(method, fn)

        def spy(enc, state, original=original):
            seen.append(enc["codes"].shape[2])
            return original(enc, state)

        setattr(method, fn, spy)
    cache = load_cache((method, states), model, block=16)
    _feed(model, cache, ids, chunk=33)
    cache.unbind()
    assert seen and max(seen) <= 16


def _bits(model, method, states, length, chunk=32):
    cache = load_cache((method, states), model)
    _feed(model, cache, _ids(1, length), chunk)
    cache.unbind()
    state_bits = sum(method.state_bits(s) for s in states) if states else 0
    return cache, 8 * cache.nbytes(), cache_bits(method, geometry_from_config(model.config), length, state_bits)


@pytest.mark.parametrize("spec, lengths", [
    ({"name": "int", "bits": 4}, [1, 37, 300]),
    ({"name": "nf", "bits": 3}, [64]),
    ({"name": "fp16"}, [50]),
    # KIVI keys leave the window a whole group at a time: the key window holds (R - G, R] tokens, R as
    # charged by the accounting when (length - sink - R) is a multiple of G (checked here)
    ({"name": "kivi", "bits": 2, "residual": 32, "group": 32}, [160, 288]),
    ({"name": "kivi", "bits": 4, "residual": 16, "group": 8}, [16, 40, 96]),
])
def test_nbytes_matches_accounting(spec, lengths):
    model = tiny_model("llama")
    opts = dict(spec)
    method = make_method(opts.pop("name"), **opts)
    for length in lengths:
        _, held, charged = _bits(model, method, None, length)
        assert held == pytest.approx(charged, rel=0.01), length


@pytest.mark.parametrize("outliers", [0.0, 0.01])
def test_nbytes_matches_accounting_kvquant(outliers):
    """Key outliers are stored as they occur (fp16 value + int16 position, plus one int32 pointer per batch row,
    head and 64 tokens); the accounting charges the nominal fraction. On the calibration data itself they agree
    within 1% (one layer: its keys are exactly the calibrated ones), and in general the difference is exactly
    the surplus outliers plus the pointers."""
    length = 402  # 401 quantized tokens: the 0.5% quantiles fall on whole tokens
    one_layer = tiny_model("llama", num_hidden_layers=1)
    method, states = _kvquant(one_layer, _ids(1, length), bits=3, outliers=outliers)
    _, held, charged = _bits(one_layer, method, states, length)
    assert held == pytest.approx(charged, rel=0.01)
    model = tiny_model("llama")
    method, states = _kvquant(model, _ids(1, length), bits=3, outliers=outliers)
    cache, held, charged = _bits(model, method, states, length)
    geom = geometry_from_config(model.config)
    stored = [layer.keys_stream.packed.outliers for layer in cache.layers] if outliers else []
    surplus = sum(int(s.counts().sum()) for s in stored) - outliers * geom.layers * (length - 1) * 2 * 16
    pointers = sum(s.ptr.shape[0] * s.ptr.shape[1] * (-(-s.n // s.block) + 1) for layer in cache.layers for s in
                   (layer.keys_stream.packed.outliers, layer.values_stream.packed.outliers)) if outliers else 0
    assert held == pytest.approx(charged + 32 * surplus, rel=1e-9)
    if outliers:  # the pointers are charged exactly
        assert 32 * pointers == 2 * geom.layers * outlier_pointer_bits(geom.kv_heads, geom.head_dim, length - 1)


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
@pytest.mark.parametrize("call", ["generate", "forward"])
def test_padded_batch_refused_under_either_cache_name(name, call):
    """transformers >= 5.24 passes the cache as ``cache=`` (``past_key_values=`` is deprecated): the refusal of a
    padded batch must see it under both names, whichever the caller used."""
    import warnings

    model = tiny_model("llama")
    if name == "cache" and cache_argument(model) != "cache":
        pytest.skip("this transformers (< 5.24) has no cache= argument")
    cache = load_cache(make_method("int", bits=4), model, batch_size=2)
    padded = torch.ones(2, 6, dtype=torch.long)
    padded[0, :2] = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated name, where this transformers warns
        with pytest.raises(KvqError, match="padded batches"):
            if call == "generate":
                model.generate(_ids(2, 6), attention_mask=padded, max_new_tokens=2, **{name: cache})
            else:
                model(_ids(2, 6), attention_mask=padded, use_cache=True, **{name: cache})
    cache.unbind()


def test_refusals():
    model = tiny_model("llama")
    with pytest.raises(KvqError, match="needs calibration"):
        load_cache(make_method("kvquant"), model)
    cache = load_cache(make_method("int", bits=4), model, batch_size=2)
    padded = torch.ones(2, 6, dtype=torch.long)
    padded[0, :2] = 0
    with pytest.raises(KvqError, match="padded batches"):
        model.generate(_ids(2, 6), attention_mask=padded, **cache_kwargs(model, cache), max_new_tokens=2)
    cache = load_cache(make_method("int", bits=4), model, batch_size=2)
    with pytest.raises(KvqError, match="batch_size 2"):
        model(_ids(1, 4), **cache_kwargs(model, cache))
    cache = load_cache(make_method("int", bits=4), model)
    with pytest.raises(KvqError, match="beam search"):
        model.generate(_ids(1, 4), **cache_kwargs(model, cache), num_beams=2, max_new_tokens=2)
    cache = load_cache(make_method("int", bits=4), model, max_tokens=8)
    with pytest.raises(KvqError, match="cache is full"):
        _feed(model, cache, _ids(1, 12), chunk=4)
    other = load_cache(make_method("int", bits=4), model)  # binding another cache unbinds the first
    with pytest.raises(KvqError, match="not bound"):
        model(_ids(1, 4), **cache_kwargs(model, cache))
    other.unbind()
    odd = tiny_model("llama", hidden_size=48, num_attention_heads=4, num_key_value_heads=2)  # head_dim 12 = 8 + 4
    with pytest.raises(KvqError, match="packed cache cannot hold"):
        load_cache(make_method("int", bits=2), odd)


def test_streaming_cli(tiny_model_dir, tiny_text_file):
    import json

    from typer.testing import CliRunner

    from kvq_cli.cli import app

    args = ["eval-ppl", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--seqlen", 48, "--max-windows", 1,
            "--method", "kivi:bits=2,residual=16,group=8", "--method", "fp16", "--json"]
    res = CliRunner().invoke(app, [str(a) for a in [*args, "--mode", "streaming", "--chunk", 10]])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["mode"] == "streaming" and doc["chunk"] == 10
    base, kivi, fp16 = doc["results"]
    assert fp16["perplexity"] == pytest.approx(base["perplexity"], rel=1e-3) and math.isfinite(kivi["perplexity"])
    assert kivi["avg_bits"] > 4  # the 16-token fp16 residual is counted (2-bit codes alone would be ~3)
    res = CliRunner().invoke(app, [str(a) for a in [*args, "--mode", "nosuch"]])
    assert res.exit_code == 2 and "--mode must be" in res.output


def kernel_vs_reference(device: str, hidden: int = 64) -> list[tuple[float, int]]:
    """Decode 7 tokens after a 59-token prompt (batch 3, MQA) with the Triton path forced on and off, for
    kvquant-3b-2% (its sparse outliers: keys beyond the calibrated range, per-token values over all heads) and
    kivi-2b (group 32, residual 32): per method, the largest logit difference and how many layer-steps the
    kernel served. Under ``torch.inference_mode``, as ``kvq generate`` runs. Used by the interpreter test and the
    CUDA test."""
    import kvq_cli.runtime.cache as runtime_cache

    used: list = []
    real = runtime_cache.kernel_decode
    runtime_cache.kernel_decode = lambda layer, q, s: used.append(real(layer, q, s)) or used[-1]
    try:
        model = tiny_model("llama", num_key_value_heads=1, hidden_size=hidden).to(device)
        ids = _ids(3, 66).to(device)
        kvquant = make_method("kvquant", bits=3, outliers=0.02, fisher=False, kmeans_iters=5)
        states = [kvquant.fit(s) for s in capture(model, ids[:1, :40], kvquant)]
        results = []
        for source in [(kvquant, states), make_method("kivi", bits=2, residual=32, group=32)]:
            logits = []
            for use in (True, False):
                cache = load_cache(source, model, batch_size=3)
                for layer in cache.layers:
                    layer.use_kernel = use
                with torch.inference_mode():  # as kvq generate runs (inference tensors: no version counters)
                    model(ids[:, :59], **cache_kwargs(model, cache))
                    steps = [model(ids[:, t : t + 1], **cache_kwargs(model, cache)).logits for t in range(59, 66)]
                logits.append(torch.cat(steps, 1))
                cache.unbind()
            results.append(((logits[0] - logits[1]).abs().max().item(), sum(u is not None for u in used)))
            used.clear()
        return results
    finally:
        runtime_cache.kernel_decode = real


def _check_kernel_results(results) -> None:
    (kvq_diff, kvq_used), (kivi_diff, kivi_used) = results
    assert kvq_used == kivi_used == 2 * 7  # layers x decode steps (KIVI's K and V leave the window together)
    assert kvq_diff < 1e-4 and kivi_diff < 1e-4


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel path is tested on it (below)")
def test_triton_decode_path_matches_reference():
    """The Triton decode kernels (interpreter on CPU, in a subprocess so TRITON_INTERPRET stays out of this
    process) give the reference path's logits within 1e-4, on every decode step."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton")
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            "from test_runtime import kernel_vs_reference; print(kernel_vs_reference('cpu'))")
    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    _check_kernel_results(eval(res.stdout.strip().splitlines()[-1]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("hidden", [64, 256])  # head_dim 16 and 64
def test_cuda_kernel_path_and_generate(hidden):
    pytest.importorskip("triton")
    _check_kernel_results(kernel_vs_reference("cuda", hidden))
    model = tiny_model("qwen2", hidden_size=hidden).cuda()
    ids = _ids(2, 11).cuda()
    plain = model.generate(ids, max_new_tokens=16, do_sample=False)
    for source in (make_method("fp16", pre_rope=True), make_method("kivi", bits=4, residual=0, group=32)):
        cache = load_cache(source, model, batch_size=2)
        out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=16, do_sample=False)
        cache.unbind()
        assert out.shape == plain.shape
        if source.name == "fp16":
            assert torch.equal(out, plain)


def test_automatic_kernel_path_is_cuda_only_and_takes_every_code_width():
    from kvq_cli.runtime.kernel_path import kernels_available

    cuda = torch.device("cuda")
    assert not kernels_available(torch.device("cpu"), make_method("kvquant", bits=4))
    pytest.importorskip("triton")
    for bits in (1, 2, 3, 4):
        assert kernels_available(cuda, make_method("kvquant", bits=bits))
    assert kernels_available(cuda, make_method("kivi", bits=2))
