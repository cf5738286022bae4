"""Triton kernels of ``kvq_kernels`` against their PyTorch references (CPU: Triton's interpreter).

Codes, packing and every stored statistic must match exactly; attention within 2e-3 relative (float32).
"""

import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402
from conftest import check_gluon_loop, check_word_path  # noqa: E402

pytest.importorskip("triton")

from kvq_kernels import reference as ref  # noqa: E402
from kvq_kernels.decode_attention import (  # noqa: E402
    decode_attention_kivi,
    decode_attention_kvquant,
    dequantize_packed_kivi,
    dequantize_packed_kvquant,
)
from kvq_kernels.pack import (  # noqa: E402
    pack_codes,
    quantize_append_kivi,
    unpack_codes,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ATTN_RTOL = 2e-3
B, H = 2, 2


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _randn(gen, *shape, scale=1.0):
    return (torch.randn(*shape, generator=gen) * scale).to(DEV)


def _codebook(gen, bits):
    return torch.sort(torch.rand(1 << bits, generator=gen) * 2 - 1).values.to(DEV)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _fill_fp16_segments(c, gen, d, n_sink, n_res):
    """Random fp16 sink and residual tokens for a packed cache of either flavour."""
    c.sink_k.copy_(_randn(gen, B, H, n_sink, d))
    c.sink_v.copy_(_randn(gen, B, H, n_sink, d))
    c.res_k[:, :, :n_res] = _randn(gen, B, H, n_res, d).half()
    c.res_v[:, :, :n_res] = _randn(gen, B, H, n_res, d).half()
    c.n_res = n_res
    return c


def _kvquant_cache(gen, d, bits_k, bits_v, t, n_sink, n_res, tmax=64, sparse=True):
    """A kvquant cache of ``t`` packed tokens; ``sparse``: KVQuant's per-row outliers too (every key entry outside
    the thresholds, 3% of the value entries at 3x)."""
    from kvq_kernels.sparse import SparseRows

    lo = (-1 - torch.rand(H, d, generator=gen)).to(DEV)
    hi = (1 + torch.rand(H, d, generator=gen)).to(DEV)
    c = ref.KVQuantCache.empty(B, H, d, tmax, bits_k, bits_v, lo, hi, _codebook(gen, bits_k), _codebook(gen, bits_v),
                               n_sink=n_sink, max_res=16, rope_theta=500.0)
    if t:
        k, v = _randn(gen, B, H, t, d, scale=1.3), _randn(gen, B, H, t, d)
        ref.append_kvquant_ref(c, k, v, 0)
        if sparse:
            c.k_sparse = SparseRows.from_dense((k < lo[None, :, None]) | (k > hi[None, :, None]), k)
            c.v_sparse = SparseRows.from_dense((torch.rand(v.shape, generator=gen) < 0.03).to(DEV), v * 3)
    c.n_packed = t
    return _fill_fp16_segments(c, gen, d, n_sink, n_res)


def _kivi_cache(gen, d, bits, t, n_sink, n_res, tmax=64):
    c = ref.KIVICache.empty(B, H, d, tmax, bits, n_sink=n_sink, max_res=16, device=DEV)
    if t:
        ref.append_kivi_ref(c, _randn(gen, B, H, t, d), _randn(gen, B, H, t, d), 0)
    c.n_packed = t
    return _fill_fp16_segments(c, gen, d, n_sink, n_res)


# ----------------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_reference_pack_is_exact_and_dense(bits):
    gen = _gen(bits)
    for d in (16, 32, 128):
        codes = torch.randint(0, 1 << bits, (3, 5, d), generator=gen, dtype=torch.uint8)
        packed = ref.pack_codes(codes, bits)
        assert packed.dtype == torch.uint8 and packed.shape[-1] * 8 == d * bits
        assert torch.equal(ref.unpack_codes(packed, bits, d), codes)
    # bit layout: plane bytes hold adjacent codes LSB first
    if bits == 2:
        assert ref.pack_codes(torch.tensor([[1, 2, 3, 0] * 4]), 2)[0, 0].item() == 1 | 2 << 2 | 3 << 4


def test_reference_rope_matches_complex_rotation():
    gen = _gen(11)
    d, t = 16, 9
    x = torch.randn(t, d, generator=gen)
    pos = torch.arange(100, 100 + t)
    got = ref.apply_rope(x, pos, 10000.0)
    inv = 1.0 / (10000.0 ** (torch.arange(d // 2, dtype=torch.float64) * 2 / d))
    z = torch.complex(x[:, : d // 2].double(), x[:, d // 2 :].double()) * torch.exp(1j * pos[:, None].double() * inv)
    want = torch.cat([z.real, z.imag], -1)
    assert torch.allclose(got.double(), want, atol=1e-4)


def test_reference_quantizers_roundtrip():
    gen = _gen(12)
    d, t = 32, 40
    k = torch.randn(B, H, t, d, generator=gen) * 1.5
    lo, hi = -torch.ones(H, d), torch.ones(H, d)
    ck = torch.linspace(-1, 1, 16)
    kh = ref.dequantize_keys_kvquant(ref.quantize_keys_kvquant(k, lo, hi, ck, 4), lo, hi, ck, 4, d)
    inside = (k >= -1) & (k <= 1)
    assert (kh - k)[inside].abs().max() <= 1 / 15 + 1e-6  # half a step of a 16-level uniform codebook
    assert torch.equal(kh[~inside], k[~inside].clamp(-1, 1))  # clipped to the thresholds (the end codes)
    v = torch.randn(B, H, t, d, generator=gen)
    vp, mn, sc = ref.quantize_values_nuq(v, ck, 4)
    vh = ref.dequantize_values_nuq(vp, mn, sc, ck, 4, d)
    assert torch.equal(mn, v.amin(-1).half()) and torch.equal(sc, (v.amax(-1) - v.amin(-1)).half())
    assert (vh - v).abs().max() <= sc.float().max() / 30 + 2e-3
    kp, ks, kz = ref.quantize_keys_kivi(k, 2)
    assert ks.shape == (B, H, 2, d)
    assert (ref.dequantize_keys_kivi(kp, ks, kz, 2, d) - k).abs().max() <= ks.float().max() / 2 + 5e-3
    vp, vs, vz = ref.quantize_values_kivi(v, 2)
    assert (ref.dequantize_values_kivi(vp, vs, vz, 2, d) - v).abs().max() <= vs.float().max() / 2 + 5e-3


@pytest.mark.parametrize("gqa", [1, 3])
def test_reference_decode_attention_matches_sdpa(gqa):
    gen = _gen(13 + gqa)
    d = 32
    c = _kvquant_cache(gen, d, 3, 2, t=21, n_sink=2, n_res=5)
    q = _randn(gen, B, H * gqa, d)
    k, v = ref.dequantize_kvquant_cache(c)
    pos = torch.arange(k.shape[2], device=k.device)
    assert torch.allclose(k[:, :, :2], ref.apply_rope(c.sink_k.float(), pos[:2], 500.0))
    want = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None].float(), k.repeat_interleave(gqa, 1), v.repeat_interleave(gqa, 1))[:, :, 0]
    assert _rel(ref.decode_attention_kvquant_ref(q, c), want) < 1e-5
    kc = _kivi_cache(gen, d, 2, t=37, n_sink=0, n_res=4)
    k, v = ref.dequantize_kivi_cache(kc)
    want = torch.nn.functional.scaled_dot_product_attention(
        q[:, :, None].float(), k.repeat_interleave(gqa, 1), v.repeat_interleave(gqa, 1))[:, :, 0]
    assert _rel(ref.decode_attention_kivi_ref(q, kc), want) < 1e-5


# ----------------------------------------------------------------------------------------------- triton: packing
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_pack_unpack_kernels_exact(bits):
    gen = _gen(20 + bits)
    for d in (16, 32):
        codes = torch.randint(0, 1 << bits, (B, H, 37, d), generator=gen, dtype=torch.uint8).to(DEV)
        packed = pack_codes(codes, bits)
        assert torch.equal(packed, ref.pack_codes(codes, bits))
        assert torch.equal(unpack_codes(packed, bits, d), codes)


@pytest.mark.parametrize("bits,d", [(1, 32), (2, 16), (3, 32), (4, 32)])
def test_quantize_append_kivi_exact(bits, d):
    gen = _gen(40 + bits)
    c1 = ref.KIVICache.empty(B, H, d, 96, bits, device=DEV)
    c2 = ref.KIVICache.empty(B, H, d, 96, bits, device=DEV)
    k, v = _randn(gen, B, H, 45, d), _randn(gen, B, H, 45, d)
    for c, fn in ((c1, ref.append_kivi_ref), (c2, quantize_append_kivi)):
        fn(c, k, v, 32)
    for f in ("k_packed", "k_scale", "k_zero", "v_packed", "v_scale", "v_zero"):
        assert torch.equal(getattr(c1, f), getattr(c2, f)), f


@pytest.mark.parametrize("group,d,g,bits", [(16, 64, 4, 2), (64, 64, 1, 4), (128, 32, 3, 2), (16, 128, 1, 3),
                                            (16, 128, 1, 1)])
def test_kivi_other_groups(group, d, g, bits):
    """kivi at groups other than 32 (powers of two >= 16; value groups min(group, D)): the Triton append stores
    exactly the reference's bytes, and decode attention (host and device counts) matches the reference over a
    packed segment that ends mid-group, with a sink and a residual."""
    gen = _gen(600 + group + d + g)
    tmax, t = 4 * group, 2 * group + 5
    c1 = ref.KIVICache.empty(B, H, d, tmax, bits, n_sink=2, max_res=16, device=DEV, group=group)
    c2 = ref.KIVICache.empty(B, H, d, tmax, bits, n_sink=2, max_res=16, device=DEV, group=group)
    k, v = _randn(gen, B, H, t, d), _randn(gen, B, H, t, d)
    for c, fn in ((c1, ref.append_kivi_ref), (c2, quantize_append_kivi)):
        fn(c, k, v, 0)
    for f in ("k_packed", "k_scale", "k_zero", "v_packed", "v_scale", "v_zero"):
        assert torch.equal(getattr(c1, f), getattr(c2, f)), f
    assert c2.v_scale.shape[-1] == d // min(group, d)
    c2.n_packed = t
    c2 = _fill_fp16_segments(c2, gen, d, 2, 7)
    q = _randn(gen, B, H * g, d)
    want = ref.decode_attention_kivi_ref(q, c2)
    assert _rel(decode_attention_kivi(q, c2, num_splits=3), want) < ATTN_RTOL
    lens = torch.tensor([c2.n_packed, c2.n_res, 0, 0], dtype=torch.int64, device=DEV)
    assert _rel(decode_attention_kivi(q, c2, lens=lens), want) < ATTN_RTOL
    with pytest.raises(ValueError, match="powers of two"):
        decode_attention_kivi(q, ref.KIVICache.empty(B, H, d, 48, bits, device=DEV, group=24))


@pytest.mark.parametrize("block", [4, 16, 64])
def test_sparse_rows_layout_roundtrip(block):
    """``SparseRows`` appended in random chunks (capacity growth included) gives back every outlier of any
    token range exactly, with per-row counts and pointers as the layout says."""
    from kvq_kernels.sparse import SparseRows

    gen = _gen(300 + block)
    b, h, d, t = 2, 3, 16, 157
    mask = torch.rand(b, h, t, d, generator=gen) < 0.08
    mask[1, 2] = False  # a row without outliers
    vals = torch.randn(b, h, t, d, generator=gen).half()
    rows, i = SparseRows(b, h, d, block=block, capacity=1), 0
    while i < t:
        j = min(t, i + int(torch.randint(1, 30, (1,), generator=gen)))
        rows.append(mask[:, :, i:j], vals[:, :, i:j])
        i = j
    assert torch.equal(rows.counts(), mask.sum((2, 3)).int())
    k = torch.arange(0, -(-t // block) + 1)
    before = torch.nn.functional.pad(mask.sum(-1).cumsum(-1), (1, 0))  # (B, H, T + 1): entries of tokens < t
    assert torch.equal(rows.ptr[..., k], before[..., (k * block).clamp(max=t)].int())
    for a, e in ((0, t), (block + 1, t - 3), (t - 1, t), (5, 5)):
        m, v = rows.dense(a, e)
        assert torch.equal(m, mask[:, :, a:e]) and torch.equal(v, torch.where(mask, vals, 0)[:, :, a:e])
    assert rows.nbytes() == 4 * int(mask.sum()) + 4 * b * h * (-(-t // block) + 1)


def test_sparse_rows_reserve_reallocates_only_when_the_counts_do_not_fit():
    """A device writer's room (``reserve``): the running bound is re-read from the true counts when it passes the
    capacity, and the buffers move only when those counts do not fit (a graph that writes them is then captured
    again), always leaving room for the reserved tokens."""
    from kvq_kernels.sparse import SparseRows

    rows = SparseRows(1, 2, 16, block=16, capacity=64)
    first = rows.val.data_ptr()
    for _ in range(300):  # tokens that add no entries: the bound keeps passing the capacity, the counts fit
        rows.reserve(1, 16)
        assert rows.bound <= rows.val.shape[-1]
        rows.advance(1)
    assert rows.val.data_ptr() == first and rows.ptr.shape[-1] >= 300 // 16 + 1
    rows.ptr[..., -(-rows.n // rows.block)] = 60  # the rows now hold 60 entries: 16 more do not fit in 64
    rows.reserve(1, 16)
    assert rows.val.shape[-1] >= 60 + 16 and rows.bound == 60 + 16


# ----------------------------------------------------------------------------------------------- triton: attention
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("gqa", [1, 3])
def test_decode_attention_kvquant(bits, gqa):
    gen = _gen(50 + 4 * bits + gqa)
    d = 32 if bits % 2 else 16
    c = _kvquant_cache(gen, d, bits, 5 - bits, t=45, n_sink=3, n_res=7)
    q = _randn(gen, B, H * gqa, d)
    want = ref.decode_attention_kvquant_ref(q, c)
    got = decode_attention_kvquant(q, c, num_splits=3, block_n=8)
    assert got.shape == q.shape and torch.isfinite(got).all()
    assert _rel(got, want) < ATTN_RTOL


@pytest.mark.parametrize("bits,gqa,density", [(2, 1, 0.1), (3, 1, 0.01), (4, 3, 0.1), (1, 2, 0.03), (2, 4, 0.0)])
def test_decode_attention_kvquant_sparse_outliers(bits, gqa, density):
    """Per-row sparse outliers (any number per token and head, as the runtime stores KVQuant's): keys beyond the
    calibrated range and random value entries, as corrections in the kernel. Dense rows (more than MAXO entries
    in a block), rows with none, a packed segment ending mid-block (the one-row fold)."""
    from kvq_kernels.sparse import SparseRows

    gen = _gen(400 + 8 * bits + gqa)
    d = 32
    t = 83
    c = _kvquant_cache(gen, d, bits, 4 - bits % 2, t=0, n_sink=5, n_res=4, tmax=96, sparse=False)
    k, v = _randn(gen, B, H, t, d, scale=1.3), _randn(gen, B, H, t, d)
    ref.append_kvquant_ref(c, k, v, 0)
    c.n_packed = t
    lo, hi = c.lo[None, :, None], c.hi[None, :, None]
    kmask = ((k < lo) | (k > hi)) & (torch.rand(k.shape, generator=gen) < density * 10).to(DEV)
    vmask = (torch.rand(v.shape, generator=gen) < density).to(DEV)
    vmask[0, 1] = False  # a row without any
    c.k_sparse = SparseRows.from_dense(kmask, k, block=16)
    c.v_sparse = SparseRows.from_dense(vmask, v * 3, block=16)
    q = _randn(gen, B, H * gqa, d)
    want = ref.decode_attention_kvquant_ref(q, c)
    plain = ref.decode_attention_kvquant_ref(q, dataclasses.replace(c, k_sparse=None, v_sparse=None))
    if density:
        assert _rel(plain, want) > 1e-2  # the outliers matter
    import kvq_kernels.decode_attention as da

    default = da.OUTLIER_CHUNK
    try:
        for bn, ns, chunk in ((8, 3, default), (16, 2, 16)):  # chunk 16: blocks with more entries than a chunk
            da.OUTLIER_CHUNK = chunk
            got = decode_attention_kvquant(q, c, num_splits=ns, block_n=bn)
            assert _rel(got, want) < ATTN_RTOL, (bn, ns, chunk)
    finally:
        da.OUTLIER_CHUNK = default


def test_decode_attention_kvquant_models_own_inv_freq():
    """Keys are rotated with the model's own inv_freq when the cache carries one (scaled RoPE variants)."""
    gen = _gen(61)
    c = _kvquant_cache(gen, 16, 2, 2, t=37, n_sink=2, n_res=3)
    q = _randn(gen, B, H, 16)
    scaled = dataclasses.replace(c, inv_freq=ref.rope_inv_freq(16, c.rope_theta) * 0.25)
    want = ref.decode_attention_kvquant_ref(q, scaled)
    assert _rel(want, ref.decode_attention_kvquant_ref(q, c)) > 1e-3  # the frequencies matter
    assert _rel(decode_attention_kvquant(q, scaled, num_splits=2, block_n=8), want) < ATTN_RTOL


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
@pytest.mark.parametrize("gqa", [1, 3])
def test_decode_attention_kivi(bits, gqa):
    gen = _gen(70 + 4 * bits + gqa)
    d = 16 if bits % 2 == 0 else 32
    c = _kivi_cache(gen, d, bits, t=45, n_sink=1 if gqa == 3 else 0, n_res=5)
    q = _randn(gen, B, H * gqa, d)
    want = ref.decode_attention_kivi_ref(q, c)
    got = decode_attention_kivi(q, c, num_splits=2, block_n=16)
    assert _rel(got, want) < ATTN_RTOL


@pytest.mark.parametrize("d,bits,gqa,dtype", [(128, 2, 4, torch.float16), (64, 2, 3, torch.float16),
                                              (64, 4, 1, torch.float16), (64, 1, 2, torch.float16),
                                              (64, 2, 4, torch.float32), (64, 2, 1, torch.float32),
                                              (128, 4, 1, torch.float32), (64, 1, 1, torch.float16)])
def test_decode_attention_kivi_words(d, bits, gqa, dtype):
    """The word-wise path (codes read as 32-bit words and made floats by bit tricks, ``KIVI_WORDS``) at the shapes
    that take it (blocks of 32, halves of whole words): the reference's attention, on a fill that is not a multiple
    of the block, with sink and residual; and the same as the byte-wise path within the fp16 dots' rounding."""
    import kvq_kernels.decode_attention as da

    dot = gqa > 1
    assert da.kivi_words({"PLAIN": da.plain_codes(dot, d, 32), "DOT": dot}, d, bits, 32)  # the shape takes the path
    gen = _gen(400 + d + 8 * bits + gqa)
    c = _kivi_cache(gen, d, bits, t=83, n_sink=2, n_res=5, tmax=128)
    q = _randn(gen, B, H * gqa, d).to(dtype)
    check_word_path(da, "KIVI_WORDS", lambda: decode_attention_kivi(q, c, num_splits=2, block_n=32),
                    ref.decode_attention_kivi_ref(q.float(), c), ATTN_RTOL if dtype == torch.float32 else 1e-2,
                    exact=dtype == torch.float32 and dot)


@pytest.mark.parametrize("gqa, t", [(2, 96), (4, 77), (16, 160)])
def test_kivi_mma_reference_is_the_kivi_reference(gqa, t):
    """``decode_mma_kivi``'s algebra in PyTorch (key operands in ``decode_mma``'s order with a query operand and
    offset per 32-token group; value operands in ``kivi_value_map``'s order, one per 32-channel group with its own
    ``p s``) gives the reference's attention over the packed tokens, a partial last group included: the maps and
    corrections the Gluon program reads are right, and each value operand's columns stay inside one group."""
    from kvq_kernels.decode_mma_kivi import kivi_maps, kivi_mma_reference

    k = torch.arange(128)
    _, _, vch, _ = kivi_maps("cpu").long()
    assert torch.equal(vch.sort().values, k) and torch.equal(vch // 32, k // 32)
    gen = _gen(700 + gqa + t)
    c = _kivi_cache(gen, 128, 2, t, 0, 0, tmax=192)
    q = _randn(gen, B, H * gqa, 128)
    assert _rel(kivi_mma_reference(q, c), ref.decode_attention_kivi_ref(q, c)) < 2e-3


def test_kivi_mma_program_compiles_without_shared_memory_in_its_loop():
    """The KIVI Gluon program compiles for sm_90 on any machine; its token loop has its 96 MMAs (32 for the scores,
    8 + 8 for their offsets ``sum(q z) - 1024 sum(q')``, and 8 + 2 + 2 for each value group's values, sums and zeros)
    and no shared-memory instruction, barrier or int-to-float conversion (``conftest.check_gluon_loop``)."""
    check_gluon_loop("decode_mma_kivi", ["kivi_compiled_counts(3, True)", "kivi_compiled_counts(16, False)"], 96)


@pytest.mark.skipif(DEV != "cuda", reason="Gluon has no CPU interpreter (the CPU checks: the two tests above)")
@pytest.mark.parametrize("gqa, t, tmax, n_sink, n_res, dtype", [
    (4, 96, 128, 2, 5, torch.float16), (16, 992, 1024, 0, 3, torch.bfloat16), (3, 320, 330, 1, 0, torch.float16),
    (2, 4096, 4096, 0, 0, torch.float16),
    (4, 864, 872, 0, 2, torch.float16)])  # the last tile moved back inside a capacity that is no multiple of 32
def test_decode_attention_kivi_mma(gqa, t, tmax, n_sink, n_res, dtype, monkeypatch):
    """2-bit KIVI GQA at head dim 128 on a GPU through ``decode_mma_kivi``'s program (``KIVI_MMA`` on, with the
    ``tl.dot`` program's fp16 segments): the reference's attention, counts on the host and on the device."""
    import kvq_kernels.decode_attention as da
    from kvq_kernels.decode_mma_kivi import kivi_mma_supported

    monkeypatch.setattr(da, "KIVI_MMA", True)
    gen = _gen(800 + gqa + t)
    c = _kivi_cache(gen, 128, 2, t, n_sink, n_res, tmax=tmax)
    q = _randn(gen, B, H * gqa, 128).to(dtype)
    assert kivi_mma_supported(q, c)
    want = ref.decode_attention_kivi_ref(q.float(), c)
    assert _rel(decode_attention_kivi(q, c), want) < 5e-3
    lens = torch.tensor([t, n_res], dtype=torch.int32, device=DEV)
    assert _rel(decode_attention_kivi(q, dataclasses.replace(c, n_packed=0, n_res=0), lens=lens), want) < 5e-3


@pytest.mark.parametrize("bk, bv, gqa, t, n_sink, tmax", [(2, 2, 4, 77, 3, 256), (4, 4, 2, 200, 0, 256),
                                                          (4, 2, 16, 64, 5, 256), (2, 4, 3, 33, 1, 256),
                                                          (2, 2, 4, 250, 2, 250)])
def test_kvq_mma_reference_is_the_kvquant_reference(bk, bv, gqa, t, n_sink, tmax):
    """``decode_mma_kvquant``'s algebra in PyTorch (keys in ``kvq_key_map`` order, dequantized in fp16 and rotated
    by their place in a 32-token block; the query rotated back by the block's start; values in ``value_map`` order)
    gives the reference's attention over the packed tokens at their positions after the sink, a last tile moved back
    off the 32-token grid included: the maps, the two rotation tables and the corrections the Gluon program reads are
    right (fp16 operands: 2e-3)."""
    from kvq_kernels.decode_mma_kvquant import kvq_key_map, kvq_mma_reference

    k = torch.arange(128)
    ch = kvq_key_map(k)
    assert torch.equal(ch.sort().values, k) and torch.equal(kvq_key_map((k + 64) % 128), (ch + 64) % 128)
    gen = _gen(900 + 10 * bk + bv + t)
    c = _kvquant_cache(gen, 128, bk, bv, t, n_sink, 0, tmax=tmax, sparse=False)
    q = _randn(gen, B, H * gqa, 128)
    kk, vv = ref.dequantize_kvquant_cache(c)
    want = ref.attention_ref(q, kk[:, :, n_sink:n_sink + t], vv[:, :, n_sink:n_sink + t])
    assert _rel(kvq_mma_reference(q, c), want) < 2e-3


@pytest.mark.parametrize("bits", [2, 4])
def test_kvq_lane_table_lookups(bits):
    """The shuffle lookup: lane ``l`` of ``lane_table`` holds fp16 pairs such that an index made of the codes (2 bits:
    two codes, 4 bits: one) with any bit 4 above them returns their codebook values."""
    from kvq_kernels.decode_mma_kvquant import lane_table

    gen = _gen(40 + bits)
    cb = _codebook(gen, bits)
    tab = lane_table(cb, bits).view(torch.float16).reshape(32, 2).float()
    c16 = cb.half().float()
    for idx in range(32):
        if bits == 2:
            assert tab[idx, 0] == c16[idx & 3] and tab[idx, 1] == c16[(idx >> 2) & 3]
        else:
            assert tab[idx, 0] == tab[idx, 1] == c16[idx & 15]


def test_kvq_mma_program_compiles_without_shared_memory_in_its_loop():
    """The KVQuant Gluon program compiles for sm_90 on any machine, 2- and 4-bit, with and without outliers; its
    token loop has its 64 MMAs (32 for the scores, 32 for the values) and no shared-memory instruction, barrier or
    int-to-float conversion (the codebook lookups are lane shuffles; ``conftest.check_gluon_loop``)."""
    check_gluon_loop("decode_mma_kvquant", ["kvq_compiled_counts(3, True, 2, 2)",
                                            "kvq_compiled_counts(16, False, 4, 4, True, True)",
                                            "kvq_compiled_counts(4, True, 4, 2, False, True)",
                                            "kvq_compiled_counts(4, True, 2, 2, True, True, nib=True)"], 64)


def _run_ptx(asm: str, regs: dict, table: list[int] | None = None) -> dict:
    """A tiny interpreter of the PTX the value lookups use (``mov``, ``shl``, ``shr``, ``lop3``, ``shfl.sync.idx``
    against a 32-lane ``table``, and ``mov`` into an fp16 pair), on 32-bit Python ints: ``regs`` maps ``$0``.. and
    the block's registers to values; returns them after the block."""
    mask = 0xFFFFFFFF

    def val(x: str) -> int:
        return regs[x] if x in regs else int(x, 0)

    for ins in asm.strip("{} ").split(";"):
        ins = ins.strip()
        if not ins or ins.startswith(".reg"):
            continue
        op, rest = ins.split(None, 1)
        if rest.startswith("{"):  # mov.b32 {$lo, $hi}, src
            lo, hi = rest[1:rest.index("}")].split(", ")
            v = val(rest.split("}, ")[1])
            regs[lo], regs[hi] = v & 0xFFFF, v >> 16
            continue
        a = [x.strip() for x in rest.split(",")]
        if op == "mov.b32":
            regs[a[0]] = val(a[1])
        elif op == "shl.b32":
            regs[a[0]] = (val(a[1]) << val(a[2])) & mask
        elif op == "shr.b32":
            regs[a[0]] = val(a[1]) >> val(a[2])
        elif op == "lop3.b32":
            x, y, z, lut = val(a[1]), val(a[2]), val(a[3]), val(a[4])
            regs[a[0]] = sum(((lut >> ((x >> i & 1) << 2 | (y >> i & 1) << 1 | (z >> i & 1))) & 1) << i
                             for i in range(32))
        elif op == "shfl.sync.idx.b32":
            regs[a[0]] = table[val(a[2]) & 31]
        else:
            raise AssertionError(f"unmodelled instruction {ins!r}")
    return regs


def test_value_nibbles_look_up_each_code_pair():
    """``VALUE_NIBBLES``' PTX (``_nibbles_asm``, then ``_nib_asm`` at each code's nibble, as ``_vlut_nib`` places
    them) returns, for every code ``4 X + J`` of two tokens' 2-bit words, the lane table's pair of their codebook
    values: random words and codebook, the PTX run by a small interpreter."""
    pytest.importorskip("triton.experimental.gluon")
    from kvq_kernels.decode_mma_kvquant import _nib_asm, _nibbles_asm, lane_table

    gen = _gen(77)
    cb = torch.randn(4, generator=gen)
    table = [int(x) & 0xFFFFFFFF for x in lane_table(cb, 2).tolist()]
    c16 = cb.half().view(torch.int16).tolist()
    for a, b in torch.randint(0, 1 << 32, (64, 2), generator=gen, dtype=torch.int64).tolist():
        r = _run_ptx(_nibbles_asm(), {"$2": a, "$3": b})
        e, o = r["$0"], r["$1"]
        for x in range(4):
            for j in range(4):
                code = 4 * x + j
                got = _run_ptx(_nib_asm(4 * (2 * x + j // 2)), {"$2": e if j % 2 == 0 else o}, table)
                want = (c16[a >> 2 * code & 3] & 0xFFFF, c16[b >> 2 * code & 3] & 0xFFFF)
                assert (got["$0"], got["$1"]) == want, (x, j)


@pytest.mark.skipif(DEV != "cuda", reason="Gluon has no CPU interpreter (the CPU checks: the three tests above)")
@pytest.mark.parametrize("bk, bv, gqa, t, tmax, n_sink, n_res, dtype, sparse, nib", [
    (2, 2, 4, 96, 128, 2, 5, torch.float16, False, False), (4, 4, 16, 992, 1024, 0, 3, torch.bfloat16, True, False),
    (2, 4, 3, 320, 330, 1, 0, torch.float16, True, False), (4, 2, 2, 4096, 4096, 4, 0, torch.float16, False, False),
    (2, 2, 4, 861, 872, 3, 2, torch.float16, True, False), (2, 2, 4, 1020, 1020, 4, 3, torch.float16, True, False),
    (2, 2, 4, 861, 872, 3, 2, torch.float16, True, True), (4, 2, 2, 4096, 4096, 4, 0, torch.float16, False, True)])
def test_decode_attention_kvquant_mma(bk, bv, gqa, t, tmax, n_sink, n_res, dtype, sparse, nib, monkeypatch):
    """KVQuant GQA at head dim 128 on a GPU through ``decode_mma_kvquant``'s program (``KVQ_MMA`` on, with the
    ``tl.dot`` program's fp16 segments and the outliers' passes): the reference's attention, counts on the host and
    on the device (fp16 operands: 5e-3); ``nib``: 2-bit values looked up from interleaved nibbles
    (``VALUE_NIBBLES``; its PTX is checked on the CPU by ``test_value_nibbles_look_up_each_code_pair``)."""
    import kvq_kernels.decode_attention as da
    import kvq_kernels.decode_mma_kvquant as km
    from kvq_kernels.decode_mma_kvquant import kvq_mma_supported

    monkeypatch.setattr(da, "KVQ_MMA", True)
    monkeypatch.setattr(km, "VALUE_NIBBLES", nib)
    gen = _gen(1000 + 10 * bk + bv + t)
    c = _kvquant_cache(gen, 128, bk, bv, t, n_sink, n_res, tmax=tmax, sparse=sparse)
    q = _randn(gen, B, H * gqa, 128).to(dtype)
    assert kvq_mma_supported(q, c)
    want = ref.decode_attention_kvquant_ref(q.float(), c)
    assert _rel(decode_attention_kvquant(q, c), want) < 5e-3
    for rows in (c.k_sparse, c.v_sparse):
        if rows is not None:
            rows._grow(0, -(-tmax // rows.block) + 2)  # pointer arrays covering the capacity
    lens = torch.tensor([t, n_res], dtype=torch.int32, device=DEV)
    assert _rel(decode_attention_kvquant(q, dataclasses.replace(c, n_packed=0, n_res=0), lens=lens), want) < 5e-3


def test_default_blocks_per_family():
    """The launch defaults follow ``DEFAULT_BLOCKS`` by family, path and kivi's width; a caller's block or warps win,
    a kivi block stays inside its key group and a dot block has at least 16 tokens."""
    import kvq_kernels.decode_attention as da
    from kvq_kernels.token_reference import TokenCache

    kivi2 = ref.KIVICache.empty(1, 1, 64, 32, 2, device=DEV)
    kivi4 = ref.KIVICache.empty(1, 1, 64, 32, 4, device=DEV, group=16)
    gen = _gen(5)
    kvq = _kvquant_cache(gen, 16, 2, 2, t=0, n_sink=0, n_res=0)
    int4 = TokenCache.empty(1, 1, 64, 32, 4, device=DEV)
    nf4 = TokenCache.empty(1, 1, 64, 32, 4, levels=torch.linspace(-1, 1, 16, device=DEV), zero=False, device=DEV)
    assert da._default_block(False, kivi2, True, None, None) == da.DEFAULT_BLOCKS[("kivi", False, 2)]
    assert da._default_block(True, kivi2, True, None, None) == da.DEFAULT_BLOCKS[("kivi", True, 2)]
    assert da._default_block(False, kivi4, True, None, None) == (16, da.DEFAULT_BLOCKS[("kivi", False, 4)][1])
    assert da._default_block(True, int4, False, None, None) == da.DEFAULT_BLOCKS[("int", True)]
    assert da._default_block(False, nf4, False, None, None) == da.DEFAULT_BLOCKS[("nf", False)]
    assert da._default_block(False, kvq, False, None, None) == da.DEFAULT_BLOCKS[("kvquant", False)]
    assert da._default_block(False, kivi2, True, 16, 4) == (16, 4)
    assert da._default_block(True, kvq, False, 8, None) == (16, da.DEFAULT_BLOCKS[("kvquant", True)][1])


@pytest.mark.parametrize("gqa", [1, 4])
def test_decode_attention_kivi_device_counts(gqa):
    """Counts read from the device (``lens``, the graph-captured launch): one launch plan made for the capacity
    gives the reference's attention at every fill, including an empty packed segment and a fill that is not a
    multiple of the block."""
    gen = _gen(95 + gqa)
    d, tmax = 32, 96
    q = _randn(gen, B, H * gqa, d)
    for t, n_res in ((0, 3), (13, 1), (45, 5), (96, 16)):
        c = _kivi_cache(gen, d, 2, t=t, n_sink=2, n_res=n_res, tmax=tmax)
        lens = torch.tensor([t, n_res], dtype=torch.int32, device=DEV)
        stale = ref.KIVICache(**{**c.__dict__, "n_packed": 7, "n_res": 0})  # host counts the kernel must ignore
        got = decode_attention_kivi(q, stale, block_n=16, lens=lens)
        assert _rel(got, ref.decode_attention_kivi_ref(q, c)) < ATTN_RTOL


@pytest.mark.parametrize("gqa", [1, 4])
def test_decode_attention_kvquant_device_counts(gqa):
    """kvquant with sparse outliers, counts read from the device (``lens``: the graph-captured launch): a plan made
    for the capacity, outlier programs over every pointer block of it, and stale host counts that the kernels
    must ignore give the reference's attention at several fills."""
    from kvq_kernels.sparse import SparseRows

    gen = _gen(410 + gqa)
    d, tmax, block = 32, 96, 16
    q = _randn(gen, B, H * gqa, d)
    for t in (0, 21, 83):
        c = _kvquant_cache(gen, d, 2, 2, t=0, n_sink=3, n_res=0, tmax=tmax, sparse=False)
        k, v = _randn(gen, B, H, max(t, 1), d, scale=1.3), _randn(gen, B, H, max(t, 1), d)
        if t:
            ref.append_kvquant_ref(c, k, v, 0)
        c.n_packed = t
        kmask = ((k < c.lo[None, :, None]) | (k > c.hi[None, :, None]))[:, :, :t]
        vmask = (torch.rand(B, H, t, d, generator=gen) < 0.05).to(DEV)
        c.k_sparse = SparseRows.from_dense(kmask, k[:, :, :t], block=block)
        c.v_sparse = SparseRows.from_dense(vmask, v[:, :, :t] * 3, block=block)
        for rows in (c.k_sparse, c.v_sparse):
            rows._grow(0, -(-tmax // block) + 2)  # pointer arrays covering the capacity
        want = ref.decode_attention_kvquant_ref(q, c)
        lens = torch.tensor([t, 0, 0, t], dtype=torch.int64, device=DEV)
        stale = dataclasses.replace(c, n_packed=5)
        got = decode_attention_kvquant(q, stale, block_n=16, lens=lens)
        assert _rel(got, want) < ATTN_RTOL, t


def test_decode_attention_edge_segments():
    """Only fp16 tokens (nothing packed yet), and only packed tokens (no sink, no residual)."""
    gen = _gen(90)
    d = 16
    q = _randn(gen, B, H, d)
    c = _kvquant_cache(gen, d, 2, 2, t=0, n_sink=2, n_res=3)
    assert _rel(decode_attention_kvquant(q, c), ref.decode_attention_kvquant_ref(q, c)) < ATTN_RTOL
    c = _kvquant_cache(gen, d, 4, 4, t=19, n_sink=0, n_res=0, sparse=False)
    assert _rel(decode_attention_kvquant(q, c, block_n=16), ref.decode_attention_kvquant_ref(q, c)) < ATTN_RTOL
    kc = _kivi_cache(gen, d, 4, t=0, n_sink=0, n_res=6)
    assert _rel(decode_attention_kivi(q, kc), ref.decode_attention_kivi_ref(q, kc)) < ATTN_RTOL
    # the softmax scale is honoured
    kc = _kivi_cache(gen, d, 4, t=33, n_sink=0, n_res=2)
    s = 0.5 / math.sqrt(d)
    assert _rel(decode_attention_kivi(q, kc, sm_scale=s), ref.decode_attention_kivi_ref(q, kc, sm_scale=s)) < ATTN_RTOL


@pytest.mark.parametrize("gqa", [1, 2])
def test_decode_attention_kvquant_long_sink_and_offsets(gqa):
    """A sink longer than a block, a packed segment that ends mid-block (the residual's rotation offset), sparse
    outliers (the one-row path folds the per-token value affine map into its accumulators)."""
    gen = _gen(160 + gqa)
    d = 32
    c = _kvquant_cache(gen, d, 2, 3, t=29, n_sink=11, n_res=6)
    q = _randn(gen, B, H * gqa, d)
    want = ref.decode_attention_kvquant_ref(q, c)
    for bn in (8, 16):
        assert _rel(decode_attention_kvquant(q, c, num_splits=3, block_n=bn), want) < ATTN_RTOL


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_decode_attention_gqa_dot_shapes(bits):
    """The tl.dot programs at D=64, BLOCK_N=16 and G=3 (padded rows): the shapes where the join-tree code layouts
    were mis-compiled on the H100 (relative errors 0.08-2.9); the dot programs now load codes bytewise."""
    gen = _gen(190 + bits)
    c = _kvquant_cache(gen, 64, bits, bits, t=53, n_sink=2, n_res=5)
    q = _randn(gen, B, H * 3, 64)
    assert _rel(decode_attention_kvquant(q, c, num_splits=2, block_n=16), ref.decode_attention_kvquant_ref(q, c)) \
        < ATTN_RTOL
    k = _kivi_cache(gen, 64, bits, t=32, n_sink=1, n_res=4)
    assert _rel(decode_attention_kivi(q, k, num_splits=2, block_n=16), ref.decode_attention_kivi_ref(q, k)) < ATTN_RTOL


@pytest.mark.parametrize("swap", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d,g", [(128, 4), (64, 3), (32, 7)])
def test_decode_attention_gqa_16_bit_queries(dtype, d, g, swap, monkeypatch):
    """16-bit queries take fp16 tensor-core dots (``F16_DOTS``: operands rounded to fp16, float32 accumulation):
    within the stated tolerance plus the output dtype's epsilon of the float32 reference, at the runtime's shapes
    (D=128, G=4, block_n=32, sparse kvquant outliers) and odd ones (G=3, 7; D=64, 32); also with the dots' operands
    swapped (``SWAP_AB`` 1: scores as ``k q^T``, 2: and values as ``v^T p^T``)."""
    import kvq_kernels.decode_attention as da
    from kvq_kernels.sparse import SparseRows

    monkeypatch.setattr(da, "SWAP_AB", swap)

    gen = _gen(210 + g)
    t = 70
    c = _kvquant_cache(gen, d, 2, 2, t=t, n_sink=1, n_res=3, tmax=96, sparse=False)
    c.k_sparse = SparseRows.from_dense((torch.rand(B, H, t, d, generator=gen) < 0.02).to(DEV),
                                       _randn(gen, B, H, t, d, scale=3.0))
    c.v_sparse = SparseRows.from_dense((torch.rand(B, H, t, d, generator=gen) < 0.02).to(DEV),
                                       _randn(gen, B, H, t, d, scale=3.0))
    k = _kivi_cache(gen, d, 2, t=64, n_sink=1, n_res=3, tmax=96)
    q = _randn(gen, B, H * g, d).to(dtype)
    for fn, rf, cache in ((decode_attention_kvquant, ref.decode_attention_kvquant_ref, c),
                          (decode_attention_kivi, ref.decode_attention_kivi_ref, k)):
        got = fn(q, cache, num_splits=2)
        tol = ATTN_RTOL + torch.finfo(dtype).eps  # plus the output's own rounding (bf16: 2^-7 apart)
        assert got.dtype == dtype and _rel(got, rf(q.float(), cache)) < tol


def test_decode_attention_under_inference_mode():
    """``kvq generate`` runs under ``torch.inference_mode``: a cache built there (no version counters) decodes, and
    the wrapper's caches of constants (key affine map, RoPE tables) still serve it."""
    gen = _gen(220)
    with torch.inference_mode():
        c = _kvquant_cache(gen, 32, 2, 2, t=20, n_sink=1, n_res=2)
        q = _randn(gen, B, H * 2, 32)
        want = ref.decode_attention_kvquant_ref(q, c)
        for _ in range(2):
            assert _rel(decode_attention_kvquant(q, c, num_splits=2), want) < ATTN_RTOL


@pytest.mark.parametrize("gqa", [1, 2])
def test_decode_attention_kivi_value_groups(gqa):
    """D=128: four value groups of 32 channels, two per half (the per-group broadcast of scales and zeros)."""
    gen = _gen(170 + gqa)
    c = _kivi_cache(gen, 128, 2, t=40, n_sink=1, n_res=3)
    q = _randn(gen, B, H * gqa, 128)
    want = ref.decode_attention_kivi_ref(q, c)
    assert _rel(decode_attention_kivi(q, c, num_splits=2), want) < ATTN_RTOL


def test_rope_block_table_exact_and_cached():
    from kvq_kernels.decode_attention import rope_block_table

    invf = ref.rope_inv_freq(16, 10000.0, DEV)
    tab = rope_block_table(invf, 32, 5)
    assert tab.shape[0] == 2 and tab.shape[1] >= 5 and tab.shape[2] == 8
    ang = (torch.arange(tab.shape[1], dtype=torch.float64, device=DEV) * 32)[:, None] * invf.double()
    assert torch.allclose(tab[0].double(), ang.cos(), atol=1e-7)
    assert torch.allclose(tab[1].double(), ang.sin(), atol=1e-7)
    assert rope_block_table(invf, 32, 3) is tab  # cached for the same frequencies
    assert rope_block_table(invf, 32, 4 * tab.shape[1]).shape[1] >= 4 * tab.shape[1]  # grows
    invf.mul_(0.5)  # changed in place: rebuilt
    again = rope_block_table(invf, 32, 5)
    assert torch.allclose(again[0, 1].double(), (32 * invf.double()).cos(), atol=1e-7)


@pytest.mark.parametrize("bits", [2, 3])
def test_dequantize_packed_kernels(bits):
    """The dequantize kernels write the dense part (kvquant: no sparse outliers; keys RoPE'd) of the reference."""
    gen = _gen(100 + bits)
    d, t = 32, 41
    c = _kvquant_cache(gen, d, bits, bits, t=t, n_sink=2, n_res=0, sparse=False)
    k, v = ref.dequantize_kvquant_cache(c)
    ok, ov = torch.zeros(B, H, t + 2, d, device=DEV), torch.zeros(B, H, t + 2, d, device=DEV)
    dequantize_packed_kvquant(c, ok, ov, offset=2)
    assert _rel(ok[:, :, 2:], k[:, :, 2:]) < 1e-5 and _rel(ov[:, :, 2:], v[:, :, 2:]) < 1e-6
    kc = _kivi_cache(gen, d, bits, t=t, n_sink=0, n_res=0)
    k, v = ref.dequantize_kivi_cache(kc)
    ok, ov = torch.zeros(B, H, t, d, device=DEV), torch.zeros(B, H, t, d, device=DEV)
    dequantize_packed_kivi(kc, ok, ov)
    assert torch.allclose(ok, k, atol=1e-5) and torch.allclose(ov, v, atol=1e-5)
