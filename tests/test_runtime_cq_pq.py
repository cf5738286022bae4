"""The packed runtime cache for ``cq`` (coupled quantization) and ``pq`` (MILLION): storage, bits, generation,
streaming evaluation and the Triton decode path (interpreter on CPU)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import (the kernel-path test below)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
from conftest import tiny_model  # noqa: E402

from kvq_cli import load_cache  # noqa: E402
from kvq_cli.accounting import cache_bits  # noqa: E402
from kvq_cli.calibration.capture import capture  # noqa: E402
from kvq_cli.errors import KvqError  # noqa: E402
from kvq_cli.hf_attention import cache_kwargs, geometry_from_config  # noqa: E402
from kvq_cli.methods import make_method  # noqa: E402
from kvq_cli.perplexity import Configuration, evaluate  # noqa: E402
from kvq_cli.runtime.stream import streaming_logits  # noqa: E402
from kvq_cli.simulate import simulated  # noqa: E402


def _ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 320, (b, t), generator=torch.Generator().manual_seed(seed))


def _fit(model, name, ids=None, **opts):
    """A quickly calibrated method (no Fisher, 5 k-means iterations); states cached per model config."""
    ids = _ids(1, 48, seed=9) if ids is None else ids
    key = (model.config.to_json_string(), name, tuple(sorted(opts.items())), tuple(ids.flatten().tolist()))
    if key not in _FITTED:
        extra = {"fisher": False} if name == "cq" else {}
        method = make_method(name, kmeans_iters=5, **extra, **opts)
        _FITTED[key] = method, [method.fit(s) for s in capture(model, ids.to(model.device), method)]
    method, states = _FITTED[key]
    return method, [{k: v.to(model.device) for k, v in s.items()} for s in states]


_FITTED: dict = {}


def _feed(model, cache, ids, chunk):
    with torch.no_grad():
        for s in range(0, ids.shape[1], chunk):
            model(ids[:, s : s + chunk], **cache_kwargs(model, cache), use_cache=True)


SPECS = [("cq", {"channels": 4, "bits": 8}), ("cq", {"channels": 2, "bits": 4, "outliers": 0.05}),
         ("cq", {"channels": 2, "bits": 3, "pre_rope": False}), ("pq", {"bits": 8, "residual": 8}),
         ("pq", {"subspaces": 4, "bits": 6, "residual": 0, "sink": 2}),
         ("pq", {"bits": 6, "residual": 4, "sink": 1, "outliers": 0.05, "head_codebooks": True, "rope_pairs": True})]
LABELS = ["cq-4c8b", "cq-2c4b-5%", "cq-2c3b-post", "pq-d2x8b-r8", "pq-m4x6b-s2", "pq-d2x6b-5%-heads-rp"]


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("name, opts", [SPECS[0], SPECS[3]], ids=["cq", "pq"])
def test_generate(arch, name, opts):
    model = tiny_model(arch)
    method, states = _fit(model, name, **opts)
    ids = _ids(2, 13)
    cache = load_cache((method, states), model, batch_size=2)
    try:
        out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=10, do_sample=False)
    finally:
        cache.unbind()
    assert out.shape == (2, 23) and cache.get_seq_length() == 22
    assert cache.layers[0].keys_stream.packed.n > 0  # the history really is quantized
    state_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer.state16.values())
    fp16_bytes = 2 * 2 * 2 * 2 * 22 * 16 * 2  # layers x K/V x batch x KV heads x tokens x head_dim x 2 bytes
    assert cache.nbytes() - state_bytes < fp16_bytes


@pytest.mark.parametrize("name, opts", SPECS, ids=LABELS)
def test_storage_is_bit_packed_and_decodes_as_the_method(name, opts):
    model = tiny_model("llama")
    method, states = _fit(model, name, **opts)
    ids = _ids(1, 40, seed=3)
    cache = load_cache((method, states), model)
    _feed(model, cache, ids, chunk=40)  # one chunk: layer 0 stores exactly the keys/values of a plain pass
    cache.unbind()
    layer, geom = cache.layers[0], geometry_from_config(model.config)
    n = geom.head_dim // method.channels if name == "cq" else method._subspaces(geom.head_dim)
    packed = layer.values_stream.packed
    codes = packed.fields["codes"].buf
    assert codes.dtype == torch.uint8 and codes.shape[-1] == math.ceil(n * method.bits / 8)
    assert layer.state16["key_codebook"].dtype == torch.float16  # fp16, as state_bits charges
    # the stored history decodes to the method's own quantization of the same values
    from transformers import DynamicCache

    plain = DynamicCache()
    with torch.no_grad():
        model(ids, **cache_kwargs(model, plain), use_cache=True)
    v = plain.layers[0].values  # (1, H, 40, D)
    s = method.sink
    want = method.fake_quant_values(v[:, :, s : s + packed.n], states[0])
    torch.testing.assert_close(packed.decode(0, packed.n, layer.state()), want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name, opts", SPECS, ids=LABELS)
def test_nbytes_matches_accounting(name, opts):
    """``nbytes`` (codes as bit-stream rows, outliers, fp16 sink/residual, fp16 codebooks) against
    ``accounting.cache_bits``: within 1% in total and on the per-token part alone (the codebooks dominate a
    tiny model's total). Rows are exact when ``n * bits`` is a multiple of 8 (all cases here); cq's outliers
    add one int32 count per group of 2048 tokens."""
    model = tiny_model("llama")
    method, states = _fit(model, name, **opts)
    geom = geometry_from_config(model.config)
    state_bits = sum(method.state_bits(s) for s in states)
    assert state_bits == geom.layers * method.state_bits_estimate(geom.kv_heads, geom.head_dim)
    for length in (1, 37, 150):
        cache = load_cache((method, states), model)
        _feed(model, cache, _ids(1, length), chunk=32)
        cache.unbind()
        held = 8 * cache.nbytes()
        charged = cache_bits(method, geom, length, state_bits)
        assert held == pytest.approx(charged, rel=0.01), length
        assert held - state_bits == pytest.approx(charged - state_bits, rel=0.01), length


def test_refusals():
    model = tiny_model("llama")  # head_dim 16
    with pytest.raises(KvqError, match="needs calibration"):
        load_cache(make_method("pq"), model)
    method, states = _fit(model, "cq", channels=4, bits=4)
    with pytest.raises(KvqError, match="divide head_dim"):
        load_cache((make_method("cq", channels=3, bits=4), states), model)


@pytest.mark.parametrize("name, opts", [SPECS[0], SPECS[1], SPECS[4]], ids=[LABELS[0], LABELS[1], LABELS[4]])
def test_streaming_matches_simulated(name, opts):
    """No residual window and chunks attending to themselves as stored: streaming and simulated quantize the
    same numbers. Without a sink the logits agree to 1e-4 (float reordering only; measured ~4e-6). With an
    fp16 sink (simulated keeps it in fp32; the 8x-scaled tiny models amplify its 2^-11 rounding to ~3e-3 in
    the logits) the greedy tokens agree (> 97%, as for kvquant in ``test_runtime``). Token by token
    (``--mode streaming --chunk 1``: every query attends to the stored cache only) the perplexities agree to
    5e-3 relative: the same sink rounding, which moves the logits by <= 3e-3 and so log-probabilities, hence
    log-perplexity, by at most twice that."""
    model = tiny_model("llama")
    ids = _ids(2, 37, seed=4)
    for sink in (0, opts.get("sink", 1)):
        method, states = _fit(model, name, **{**opts, "sink": sink})
        with torch.no_grad(), simulated(model, method, states):
            sim = model(ids).logits
        stream = streaming_logits(model, ids, method, states, chunk=11, full_chunk=False)
        if sink == 0:
            torch.testing.assert_close(stream, sim, rtol=0, atol=1e-4)
        else:
            assert (stream.argmax(-1) == sim.argmax(-1)).float().mean() > 0.97
    config = Configuration(method.label, method, states)
    _, sim_row = evaluate(model, ids[:, :20], [config], batch_size=2)
    _, stream_row = evaluate(model, ids[:, :20], [config], batch_size=2, mode="streaming", chunk=1)
    assert stream_row["perplexity"] == pytest.approx(sim_row["perplexity"], rel=5e-3)


def test_streaming_cli(tiny_model_dir, tiny_text_file, tmp_path):
    from typer.testing import CliRunner

    from kvq_cli.cli import app

    def run(*args):
        return CliRunner().invoke(app, [str(a) for a in args])

    arts = []
    for spec in ("cq:channels=4,bits=6,fisher=false,kmeans_iters=3", "pq:bits=6,residual=8,kmeans_iters=3"):
        arts.append(tmp_path / f"{spec[:2]}.safetensors")
        res = run("calibrate", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--samples", 2, "--seqlen", 32,
                  "--method", spec, "--out", arts[-1])
        assert res.exit_code == 0, res.output
    res = run("eval-ppl", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--seqlen", 40, "--max-windows", 1,
              "--artifact", arts[0], "--artifact", arts[1], "--mode", "streaming", "--chunk", 12, "--json")
    assert res.exit_code == 0, res.output
    base, cq, pq = json.loads(res.stdout)["results"]
    assert cq["name"] == "cq-4c6b-no-fisher" and pq["name"] == "pq-d2x6b"
    assert math.isfinite(cq["perplexity"]) and math.isfinite(pq["perplexity"]) and cq["kl_divergence"] > 0


def test_pq_kernel_layouts():
    """What the pq decode kernel is handed: per-head codebooks as they are, RoPE-pair keys with their channel
    order; sparse outliers (no slots in the kernel) go to the reference path."""
    from kvq_cli.methods.product import rope_pair_order
    from kvq_cli.runtime.kernel_path import kernel_cache

    model = tiny_model("llama")
    ids = _ids(1, 30, seed=2)
    for opts, want in (({"head_codebooks": True, "rope_pairs": True}, "pq"), ({"outliers": 0.05}, None)):
        method, states = _fit(model, "pq", bits=6, residual=4, **opts)
        cache = load_cache((method, states), model)
        _feed(model, cache, ids, chunk=30)
        cache.unbind()
        kc = kernel_cache(cache.layers[0])
        if want is None:
            assert kc is None
            continue
        assert kc.ck.shape == (2, 8, 64, 2) and kc.head_dim == 16 and kc.subspaces == 8
        assert torch.equal(kc.key_order, rope_pair_order(16))


# ----------------------------------------------------------------------------------------------- Triton path
def kernel_vs_reference(device: str) -> dict[str, tuple[bool, float, int]]:
    """Greedy generation (batch 2, 21-token prompt, 5 new tokens, tiny GQA Llama) with the Triton decode path
    forced on and off, per method label: (same tokens, largest logit difference, decode steps the kernel
    served); pq also with per-head codebooks and RoPE-pair key subspaces."""
    import kvq_cli.runtime.cache as runtime_cache

    served: list = []
    real = runtime_cache.kernel_decode
    runtime_cache.kernel_decode = lambda layer, q, s: served.append(real(layer, q, s)) or served[-1]
    try:
        model = tiny_model("llama").to(device)
        ids = _ids(2, 21).to(device)
        results = {}
        for name, opts in (("cq", {"channels": 4, "bits": 8}), ("pq", {"bits": 7, "residual": 5}),
                           ("pq", {"bits": 7, "residual": 5, "head_codebooks": True, "rope_pairs": True})):
            method, states = _fit(model, name, ids=ids[:1], **opts)
            outs = []
            for use in (True, False):
                cache = load_cache((method, states), model, batch_size=2)
                for layer in cache.layers:
                    layer.use_kernel = use
                with torch.no_grad():
                    out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=5, do_sample=False,
                                         output_logits=True, return_dict_in_generate=True)
                cache.unbind()
                outs.append((out.sequences, torch.stack(out.logits)))
            (s1, l1), (s2, l2) = outs
            results[method.label] = (torch.equal(s1, s2), (l1 - l2).abs().max().item(),
                                     sum(u is not None for u in served))
            served.clear()
        return results
    finally:
        runtime_cache.kernel_decode = real


def _check(results) -> None:
    for name, (same, diff, served) in results.items():
        assert served == 2 * 4, name  # 2 layers x 4 decode steps (the first new token comes from the prefill)
        assert same and diff < 1e-3, (name, diff)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel path is tested on it (below)")
def test_triton_decode_path_same_greedy_tokens():
    pytest.importorskip("triton")
    _check(kernel_vs_reference("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_kernel_path_same_greedy_tokens():
    pytest.importorskip("triton")
    _check(kernel_vs_reference("cuda"))
