"""The fast CPU reference path computes exactly what the plain formulas compute: byte-spread unpacking, sparse
outlier entries, table dequantization, memoized RoPE, the sink-merged blocks and the CPU's fused
kernel for blocks of several queries."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from kvq_kernels.reference import pack_codes, planes, unpack_codes
from kvq_kernels.sparse import SparseRows
from torch import nn

from kvq_cli import load_cache
from kvq_cli.calibration.capture import capture
from kvq_cli.hf_attention import cache_kwargs
from kvq_cli.methods import make_method
from kvq_cli.methods.quant_ops import denormalize, dequantize_codes
from kvq_cli.runtime.attention import Rope, block_bounds, blockwise_attention, dense_attention, fused_cpu
from kvq_cli.runtime.storage import PackedStore


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _unpack_bitwise(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """The layout's definition, one code at a time: plane p's byte j holds codes ``j * n + s`` at bits ``s * p``."""
    out = torch.zeros(*packed.shape[:-1], d, dtype=torch.int64)
    col = low = 0
    for p in planes(bits):
        n = 8 // p
        for c in range(d):
            byte = packed[..., col + c // n].long()
            out[..., c] |= ((byte >> (c % n * p)) & ((1 << p) - 1)) << low
        col, low = col + d // n, low + p
    return out.to(torch.uint8)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("d", [16, 64])
def test_unpack_codes_is_the_layout(bits, d):
    packed = torch.randint(0, 256, (2, 3, 7, d * bits // 8), dtype=torch.uint8, generator=_gen(bits * d))
    want = _unpack_bitwise(packed, bits, d)
    assert torch.equal(unpack_codes(packed, bits, d), want)
    view = packed.transpose(1, 2)[:, 1:6]  # strided, odd length
    assert torch.equal(unpack_codes(view, bits, d), want.transpose(1, 2)[:, 1:6])
    codes = torch.randint(0, 1 << bits, (5, d), dtype=torch.uint8, generator=_gen(bits))
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, d), codes)


@pytest.mark.parametrize("block", [4, 64])
@pytest.mark.parametrize("tokens", [1, 9, 130])
def test_sparse_entries_equal_dense(block, tokens):
    gen = _gen(block + tokens)
    mask = torch.rand(2, 3, tokens, 16, generator=gen) < 0.06
    mask[1, 2] = False  # a row without outliers
    values = torch.randn(2, 3, tokens, 16, generator=gen).half()
    rows = SparseRows.from_dense(mask, values, block)
    for a, b in [(0, tokens), (0, min(tokens, block)), (1, tokens), (min(block, tokens), tokens), (2, 2)]:
        if a > b:
            continue
        flat, vals = rows.entries(a, b)
        x = torch.zeros(2, 3, b - a, 16)
        x.view(-1)[flat] = vals.float()
        assert torch.equal(x, torch.where(mask, values.float(), 0.0)[:, :, a:b])
        dmask, dvals = rows.dense(a, b)
        assert torch.equal(dmask, mask[:, :, a:b]) and torch.equal(dvals.float(), x)


def _advanced_lookup(codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """The lookup as it was: advanced indexing with int64 codes."""
    if codebook.dim() == 1:
        return codebook[codes.long()]
    return codebook[torch.arange(codebook.shape[0]).view(1, -1, 1, 1), codes.long()]


@pytest.mark.parametrize("per_head", [False, True])
def test_dequantize_codes_is_denormalize_of_lookup(per_head):
    gen = _gen(int(per_head))
    h, d, k = 3, 16, 8
    shape = (h, k) if per_head else (k,)
    codebook = (torch.rand(*shape, generator=gen) * 2 - 1).sort().values
    codes = torch.randint(0, k, (2, h, 11, d), dtype=torch.uint8, generator=gen)
    lo = torch.randn(1, h, 1, d, generator=gen) * 3
    hi = lo + torch.rand(1, h, 1, d, generator=gen) * 5
    want = denormalize(_advanced_lookup(codebook, codes), lo, hi)
    assert torch.equal(dequantize_codes(codebook, codes, lo, hi), want)  # per channel: one (H, D, K) table
    zero = torch.randn(2, h, 11, 1, generator=gen).half().float()
    top = zero + torch.rand(2, h, 11, 1, generator=gen).half().float()
    want = denormalize(_advanced_lookup(codebook, codes), zero, top)
    assert torch.equal(dequantize_codes(codebook, codes, zero, top), want)  # per vector


@pytest.mark.parametrize("spec", [
    dict(name="kvquant", bits=3, outliers=0.05),
    dict(name="kvquant", bits=2, outliers=0.05, head_codebooks=True),
    dict(name="kvquant", bits=4, per_channel=False, outliers=0.02),
    dict(name="kivi", bits=4, group=4),
])
@pytest.mark.parametrize("is_key", [True, False])
def test_packed_store_decodes_what_the_method_decodes(spec, is_key):
    """The stored path (packed codes, sparse outliers) equals the method's decode of its own encoding, bit for bit,
    on odd block edges."""
    spec = dict(spec)
    method = make_method(spec.pop("name"), **spec)
    gen = _gen(7)
    b, h, t, d = 2, 3, 37 if method.name != "kivi" else 36, 16
    k = 1 << method.bits
    book = lambda: (torch.rand(h, k, generator=gen) * 2 - 1).sort().values  # noqa: E731
    state = {"key_codebook": book() if spec.get("head_codebooks") else book()[0],
             "value_codebook": book() if spec.get("head_codebooks") else book()[0]}
    state["key_lo"] = -torch.rand(h, d, generator=gen) * 2
    state["key_hi"] = torch.rand(h, d, generator=gen) * 2
    x = torch.randn(b, h, t, d, generator=gen) * 1.5
    encode, decode = ((method.encode_keys, method.decode_keys) if is_key else
                      (method.encode_values, method.decode_values))
    enc = encode(x, state)
    step = method.group if method.name == "kivi" and is_key else 1
    store = PackedStore(method, is_key, step, None)
    store.append(enc)
    for a, e in [(0, t), (step * 3, t), (0, step * 5)]:
        part = {name: v[:, :, a // step : -(-e // step)] if name in ("scale", "zero") and step > 1 else
                v[:, :, a:e] for name, v in enc.items()}
        if "scale" in enc and enc["scale"].shape[1] == 1:  # token_scales: (B, 1, T, 1)
            part["scale"], part["zero"] = enc["scale"][:, :, a:e], enc["zero"][:, :, a:e]
        assert torch.equal(store.decode(a, e, state), decode(part, state))


class _Rotary(nn.Module):
    def __init__(self, d: int, scaling: float):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)))
        self.attention_scaling = scaling


def _hf_rope(module: nn.Module, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """transformers' ``apply_rotary_pos_emb`` for keys, as ``Rope.apply`` computed it before the memo."""
    freqs = positions.float()[:, None] * module.inv_freq[None, :]
    emb = torch.cat([freqs, freqs], -1)
    cos, sin = emb.cos() * module.attention_scaling, emb.sin() * module.attention_scaling
    half = k.shape[-1] // 2
    return k * cos + torch.cat([-k[..., half:], k[..., :half]], -1) * sin


@pytest.mark.parametrize("d, scaling", [(16, 1.0), (64, 0.7)])
def test_rope_memo_is_exact(d, scaling):
    module = _Rotary(d, scaling)
    rope = Rope(module)
    gen = _gen(d)
    ranges = [(0, 1), (0, 40), (0, 41), (3, 9), (0, 300), (40, 45), (0, 45), (7, 8)]  # growing, reused, evicted
    for a, b in ranges:
        k = torch.randn(2, 3, b - a, d, generator=gen) * 3
        assert torch.equal(rope.apply(k, torch.arange(a, b)), _hf_rope(module, k, torch.arange(a, b)))
    positions = torch.tensor([5, 2, 9])
    k = torch.randn(1, 2, 3, d, generator=gen)
    assert torch.equal(rope.apply(k, positions), _hf_rope(module, k, positions))
    module.inv_freq.mul_(0.5)  # dynamic RoPE: the memo is dropped
    k = torch.randn(1, 2, 45, d, generator=gen)
    assert torch.equal(rope.apply(k, torch.arange(0, 45)), _hf_rope(module, k, torch.arange(0, 45)))


def test_block_bounds_put_the_sink_in_the_first_block():
    assert block_bounds(2049, 1, 65536) == [(0, 2049)]
    assert block_bounds(53, 3, 16) == [(0, 19), (19, 35), (35, 51), (51, 53)]  # edges stay aligned after the sink
    assert block_bounds(53, 0, 16) == [(0, 16), (16, 32), (32, 48), (48, 53)]
    assert block_bounds(3, 3, 4) == [(0, 3)] and block_bounds(0, 0, 4) == []


@pytest.mark.parametrize("hq, hkv, total, tq, block", [(6, 2, 37, 9, 5), (3, 3, 20, 20, 8), (4, 1, 70, 3, 64)])
def test_fused_cpu_blocks_equal_the_online_softmax(hq, hkv, total, tq, block):
    """Several queries on the CPU go block by block through the fused kernel (blocks the first queries cannot
    see included): the same attention as the plain online softmax and as dense attention."""
    gen = _gen(total)
    k, v = (torch.randn(2, hkv, total, 24, generator=gen) for _ in range(2))
    q = torch.randn(2, hq, tq, 24, generator=gen)
    bounds = block_bounds(total, 2, block)
    assert fused_cpu(q)
    got = blockwise_attention(q, lambda a, e: (k[:, :, a:e], v[:, :, a:e]), total, 0.2, bounds)
    want = dense_attention(q, k, v, 0.2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    one = blockwise_attention(q[:, :, -1:], lambda a, e: (k[:, :, a:e], v[:, :, a:e]), total, 0.2, bounds)
    torch.testing.assert_close(one, want[:, :, -1:], rtol=0, atol=1e-5)  # one query: the online softmax


def _decode_run(model, method, states, ids, steps, **load):
    """Prefill ``ids`` in chunks of 13, then ``steps`` decode steps (fed ``ids`` again): the logits of every step
    ``(steps, V)``, the cache, and per step whether each layer's mirror held exactly what its streams decode."""
    cache = load_cache((method, states), model, block=16, **load)
    kw, logits, exact = cache_kwargs(model, cache), [], []
    with torch.no_grad():
        for s in range(0, ids.shape[1], 13):
            out = model(ids[:, s : s + 13], **kw, use_cache=True).logits
        for i in range(steps):  # fixed tokens (not greedy: a near tie must not fork the two runs)
            out = model(ids[:, i : i + 1], **kw, use_cache=True).logits
            logits.append(out[0, -1])
            for layer in cache.layers:
                m = layer.mirror
                if m is not None and m.n:
                    k, v = layer.decode(0, m.n)
                    exact.append(torch.equal(m.k[:, :, : m.n], k) and torch.equal(m.v[:, :, : m.n], v))
    cache.unbind()
    return torch.stack(logits), cache, exact


@pytest.mark.parametrize("spec", [dict(name="kvquant", bits=3, outliers=0.05),
                                  dict(name="kivi", bits=2, group=8, residual=8)])
def test_decoded_mirror_gives_the_reference_logits(spec):
    """The CPU mirror of decoded blocks (``runtime.decoded``) against re-dequantizing the history every step: over
    20 decode steps (past block edges at 16 tokens, kvquant's key and value outliers, KIVI's key groups leaving the
    window), each layer's mirror equals what its streams decode, bit for bit, and the logits agree to 1e-5 (the
    same numbers; only the attention reads them as views). A mirror capped at 23 tokens (KIVI: 16, whole groups)
    decodes the rest per read (blocks straddle its end). ``nbytes`` never counts the mirror."""
    model = tiny_model("llama")
    ids = torch.randint(0, 320, (1, 40), generator=_gen(3))
    spec = dict(spec)
    method = make_method(spec.pop("name"), **({"fisher": False, "kmeans_iters": 5} if "outliers" in spec else {}),
                         **spec)
    states = [method.fit(s) for s in capture(model, ids, method)] if method.needs_calibration else None
    want, plain, _ = _decode_run(model, method, states, ids, 20, mirror_budget=0)
    layer = plain.layers[0]
    per_token = len(plain.layers) * 2 * layer.keys_stream.sink.buf.shape[1] * layer.keys_stream.sink.buf.shape[3] * 4
    for budget, held in [(1 << 20, 60), (23 * per_token, 23)]:
        got, cache, exact = _decode_run(model, method, states, ids, 20, mirror_budget=budget)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert exact and all(exact)
        for la in cache.layers:  # KIVI's mirror stops at a whole key group (sink 0, group 8)
            assert la.mirror.n == min(held - held % la.step, la.mirror.stable(la))
        assert cache.nbytes() == plain.nbytes() and plain.mirror_nbytes() == 0 < cache.mirror_nbytes() <= budget
    if method.name == "kvquant":
        assert layer.keys_stream.packed.outliers.n and layer.values_stream.packed.outliers.n


def test_decoded_mirror_extends_and_resets():
    """The mirror follows appends (fresh encodings or read back), is dropped by ``reset`` and rebuilt from the new
    streams."""
    model = tiny_model("llama")
    cache = load_cache(make_method("int", bits=4), model, block=16)
    kw = cache_kwargs(model, cache)
    layer = cache.layers[0]
    with torch.no_grad():
        model(torch.arange(1, 30)[None], **kw, use_cache=True)
        assert layer.mirror.n == layer.length == 29
        model(torch.tensor([[5]]), **kw, use_cache=True)  # one token: decoded from its fresh encoding
        assert layer.mirror.n == 30
        k, v = layer.decode(0, 30)
        assert torch.equal(layer.read(0, 30)[0], k) and torch.equal(layer.read(3, 30)[1], v[:, :, 3:])
        cache.reset()
        assert layer.mirror.n == 0 and cache.mirror_nbytes() == 0
        model(torch.arange(7, 12)[None], **kw, use_cache=True)
        assert layer.mirror.n == 5 and torch.equal(layer.read(0, 5)[0], layer.decode(0, 5)[0])
    cache.unbind()
