"""Chunked prefill: history blocks + the chunk in full precision, merged by log-sum-exp (``runtime.prefill``)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from kvq_cli import load_cache
from kvq_cli.calibration.capture import capture
from kvq_cli.hf_attention import cache_kwargs
from kvq_cli.methods import make_method
from kvq_cli.runtime.attention import dense_attention
from kvq_cli.runtime.prefill import chunked_prefill, history_block, lse_attention_ref, merge
from kvq_cli.runtime.stream import streaming_logits


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen)


@pytest.mark.parametrize("hq, hkv, history, tq", [(4, 2, 37, 5), (3, 3, 0, 7), (6, 1, 130, 1)])
def test_chunked_prefill_equals_dense_attention(hq, hkv, history, tq):
    gen = torch.Generator().manual_seed(hq * 100 + history)
    b, d = 2, 16
    k, v = _randn(gen, b, hkv, history + tq, d), _randn(gen, b, hkv, history + tq, d)
    q = _randn(gen, b, hq, tq, d)
    bounds = [(a, min(a + 16, history)) for a in range(0, history, 16)]
    got = chunked_prefill(q, lambda a, e: (k[:, :, a:e], v[:, :, a:e]), bounds, k[:, :, history:], v[:, :, history:],
                          0.3, attend=lse_attention_ref)
    want = dense_attention(q, k, v, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_lse_and_merge():
    gen = torch.Generator().manual_seed(3)
    q, k, v = _randn(gen, 1, 2, 3, 8), _randn(gen, 1, 2, 10, 8), _randn(gen, 1, 2, 10, 8)
    out, lse = lse_attention_ref(q, k, v, 1.0, False)
    s = torch.einsum("bhtd,bhld->bhtl", q, k)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    merged = merge(lse_attention_ref(q, k[:, :, :4], v[:, :, :4], 1.0, False),
                   lse_attention_ref(q, k[:, :, 4:], v[:, :, 4:], 1.0, False))
    torch.testing.assert_close(merged[0], out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(merged[1], lse, rtol=1e-5, atol=1e-6)


def test_history_block_sizes():
    assert history_block(1, 32, 128) == 16384 and history_block(8, 32, 128) == 2048
    assert history_block(64, 64, 256) == 1024  # floor
    assert history_block(1, 1, 64) == 65536  # cap
    assert history_block(1, 32, 64, step=48) % 48 == 0
    assert history_block(1, 8, 64, quarter=True) == 32768


def _kvquant(model, ids):
    method = make_method("kvquant", bits=2, outliers=0.02, fisher=False, kmeans_iters=5)
    return method, [method.fit(s) for s in capture(model, ids, method)]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_one_chunk_is_full_precision(arch):
    """A window prefilled as one chunk attends only to itself, in full precision: the plain model's logits."""
    model = tiny_model(arch)
    ids = torch.randint(0, 320, (2, 33), generator=torch.Generator().manual_seed(1))
    method, states = _kvquant(model, ids[:1])
    with torch.no_grad():
        plain = model(ids).logits
    stream = streaming_logits(model, ids, method, states, chunk=33)
    torch.testing.assert_close(stream, plain, rtol=0, atol=1e-4)
    stored = streaming_logits(model, ids, method, states, chunk=33, full_chunk=False)
    assert (stored - plain).abs().max() > 1e-2  # as stored, the 2-bit keys show


@pytest.mark.parametrize("spec", ["kvquant", "kivi"])
def test_fast_prefill_path_equals_reference(spec):
    """The LSE-merging prefill (FlashAttention on CUDA; forced here with its PyTorch stand-in) computes what
    the blockwise reference computes, with history blocks smaller than the history."""
    model = tiny_model("mistral")
    ids = torch.randint(0, 320, (1, 70), generator=torch.Generator().manual_seed(2))
    if spec == "kvquant":
        method, states = _kvquant(model, ids)
    else:
        method, states = make_method("kivi", bits=2, residual=8, group=8), None
    logits = {}
    for fast in (False, True):
        cache = load_cache((method, states), model, block=16)
        for layer in cache.layers:
            layer.prefill_fast, layer.prefill_block = fast, 16  # several history blocks
        with torch.no_grad():
            logits[fast] = torch.cat([model(ids[:, s : s + 25], **cache_kwargs(model, cache), use_cache=True).logits
                                      for s in range(0, 70, 25)], 1)
        cache.unbind()
    # float reordering (~1e-6 per attention) can flip a 2-bit KIVI code downstream: hence 5e-3 for kivi; a wrong
    # merge or block would be off by O(0.1)
    torch.testing.assert_close(logits[True], logits[False], rtol=0, atol=1e-4 if spec == "kvquant" else 5e-3)
    assert math.isfinite(float(logits[True].abs().max()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlashAttention with log-sum-exp runs on CUDA only")
@pytest.mark.parametrize("causal", [False, True])
def test_flash_lse_attention_matches_reference_on_cuda(causal):
    from kvq_cli.runtime.prefill import lse_attention

    gen = torch.Generator(device="cuda").manual_seed(5)
    q = torch.randn(2, 8, 77, 64, device="cuda", generator=gen).bfloat16()
    k, v = (torch.randn(2, 2, 77, 64, device="cuda", generator=gen).bfloat16() for _ in range(2))
    out, lse = lse_attention(q, k, v, 0.125, causal)
    want, want_lse = lse_attention_ref(q, k, v, 0.125, causal)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=2e-2)  # bf16 inputs, fp32 accumulation
    torch.testing.assert_close(out, want, rtol=0, atol=2e-2)
