"""Triton decode attention for ``cq`` and ``pq`` against their PyTorch references (CPU: Triton's interpreter).

Code rows must match exactly; attention within 2e-3 relative (float32 throughout, as ``test_kernels``: the
kernels reorder sums, use exp2 and rotate keys by ``R(j)`` and the query by ``-p0``, which costs ~1e-6 at
these sizes; 2e-3 leaves room for the GPU's faster transcendental functions yet catches any wrong token,
head or code, which moves the output by > 1e-2).
"""

import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402
import math  # noqa: E402

import pytest  # noqa: E402

pytest.importorskip("triton")

from kvq_kernels import vq_reference as ref  # noqa: E402
from kvq_kernels.cq_decode import decode_attention_cq  # noqa: E402
from kvq_kernels.pq_decode import decode_attention_pq  # noqa: E402
from kvq_kernels.vq_pack import unpack_vq_codes  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ATTN_RTOL = 2e-3
B, H = 2, 3  # odd KV heads


def _gen(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(seed)


def _randn(gen, *shape):
    return torch.randn(*shape, generator=gen).to(DEV)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _fill(c, gen, t, n_sink, n_res):
    """Random codes for ``t`` packed tokens (the rest of the rows stay zero) and fp16 sink/residual tokens."""
    n = c.groups if isinstance(c, ref.CQCache) else c.subspaces
    d = c.head_dim
    b, h = c.k_codes.shape[:2]
    for buf in (c.k_codes, c.v_codes):
        codes = torch.randint(0, 1 << c.bits, (b, h, t, n), generator=gen)
        buf[:, :, :t] = ref.pack_vq_codes(codes, c.bits).to(DEV)
    c.sink_k.copy_(_randn(gen, b, h, n_sink, d))
    c.sink_v.copy_(_randn(gen, b, h, n_sink, d))
    c.res_k[:, :, :n_res] = _randn(gen, b, h, n_res, d).half()
    c.res_v[:, :, :n_res] = _randn(gen, b, h, n_res, d).half()
    c.n_packed, c.n_res = t, n_res
    return c


def cq_cache(gen, d, channels, bits, t, n_sink, n_res, pre_rope=True, dtype=torch.float16):
    shape = (H, d // channels, 1 << bits, channels)
    ck, cv = (torch.randn(*shape, generator=gen).to(DEV, dtype) for _ in range(2))
    c = ref.empty_vq_cache("cq", B, H, 53, bits, ck, cv, n_sink=n_sink, max_res=16, pre_rope=pre_rope,
                           rope_theta=500.0)
    return _fill(c, gen, t, n_sink, n_res)


def pq_cache(gen, d, subspaces, bits, t, n_sink, n_res, per_head=False, key_order=None):
    shape = (H,) * per_head + (subspaces, 1 << bits, d // subspaces)
    ck, cv = (torch.randn(*shape, generator=gen).to(DEV) for _ in range(2))
    c = ref.empty_vq_cache("pq", B, H, 53, bits, ck, cv, n_sink=n_sink, max_res=16, key_order=key_order)
    return _fill(c, gen, t, n_sink, n_res)


# ----------------------------------------------------------------------------------------------- code rows
def test_code_rows_reference_layout():
    codes = torch.tensor([[5, 1, 7, 2, 0]])
    packed = ref.pack_vq_codes(codes, 3)  # bits 101 100 111 010 000 -> LSB-first stream
    assert packed.shape == (1, 2) and packed.dtype == torch.uint8
    assert packed[0, 0].item() == 5 | 1 << 3 | (7 & 3) << 6 and packed[0, 1].item() == 7 >> 2 | 2 << 1
    assert torch.equal(ref.pack_vq_codes(torch.tensor([[200, 17]]), 8), torch.tensor([[200, 17]], dtype=torch.uint8))


@pytest.mark.parametrize("bits", range(1, 13))
def test_code_rows_exact(bits):
    gen = _gen(bits)
    for n in (3, 8, 16):
        codes = torch.randint(0, 1 << bits, (2, 5, n), generator=gen).to(torch.int16)
        packed = ref.pack_vq_codes(codes, bits)
        assert packed.shape[-1] == ref.row_bytes(n, bits) == math.ceil(n * bits / 8)
        assert torch.equal(ref.unpack_vq_codes(packed, bits, n), codes)
        assert torch.equal(unpack_vq_codes(packed.to(DEV), bits, n).cpu(), codes)


# ----------------------------------------------------------------------------------------------- references
def test_pq_reference_table_scores_equal_decoded_keys():
    """The table path of the PQ reference equals plain attention over decoded keys."""
    gen = _gen(3)
    c = pq_cache(gen, 16, 8, 5, t=29, n_sink=2, n_res=3)
    q = _randn(gen, B, H * 2, 16)
    codes = ref.unpack_vq_codes(c.k_codes[:, :, :29], 5, 8)
    kq = ref.pq_decode_codes(codes, c.ck)
    vq = ref.pq_decode_codes(ref.unpack_vq_codes(c.v_codes[:, :, :29], 5, 8), c.cv)
    k, v = ref._full(c, kq, vq)
    from kvq_kernels.reference import attention_ref

    assert _rel(ref.decode_attention_pq_ref(q, c), attention_ref(q, k, v)) < 1e-5


def test_pq_reference_per_head_codebooks_and_key_order():
    """Per-head codebooks and a key channel order (kvq's head_codebooks / rope_pairs): the table path equals
    plain attention over the decoded keys put back in natural channel order."""
    from kvq_kernels.reference import attention_ref

    gen = _gen(4)
    order = torch.randperm(16, generator=gen)
    c = pq_cache(gen, 16, 8, 5, t=29, n_sink=2, n_res=3, per_head=True, key_order=order.to(DEV))
    assert c.head_dim == 16 and c.subspaces == 8
    q = _randn(gen, B, H * 2, 16)
    kq = ref.pq_decode_codes(ref.unpack_vq_codes(c.k_codes[:, :, :29], 5, 8), c.ck)  # (B, H, T, D) in `order`
    codes = ref.unpack_vq_codes(c.k_codes[:, :, :29], 5, 8).long()
    torch.testing.assert_close(kq[1, 2, 3, 4:6], c.ck[2, 2, codes[1, 2, 3, 2]].float())  # head 2's codebook
    kq = kq[..., order.to(DEV).argsort()]
    vq = ref.pq_decode_codes(ref.unpack_vq_codes(c.v_codes[:, :, :29], 5, 8), c.cv)
    k, v = ref._full(c, kq, vq)
    assert _rel(ref.decode_attention_pq_ref(q, c), attention_ref(q, k, v)) < 1e-5


# ----------------------------------------------------------------------------------------------- triton attention
@pytest.mark.parametrize("channels,bits,gqa,pre_rope", [(4, 8, 1, True), (2, 5, 3, True), (8, 11, 2, False),
                                                        (1, 3, 3, True)])
def test_decode_attention_cq(channels, bits, gqa, pre_rope):
    gen = _gen(10 + bits)
    d = 16
    c = cq_cache(gen, d, channels, bits, t=37, n_sink=1, n_res=5, pre_rope=pre_rope,
                 dtype=torch.float32 if bits == 5 else torch.float16)
    q = _randn(gen, B, H * gqa, d)
    want = ref.decode_attention_cq_ref(q, c)
    got = decode_attention_cq(q, c, num_splits=3, block_n=8)
    assert got.shape == q.shape and torch.isfinite(got).all()
    assert _rel(got, want) < ATTN_RTOL


@pytest.mark.parametrize("subspaces,bits,gqa", [(8, 8, 1), (4, 6, 3), (16, 9, 2)])
def test_decode_attention_pq(subspaces, bits, gqa):
    gen = _gen(30 + bits)
    d = 16
    c = pq_cache(gen, d, subspaces, bits, t=37, n_sink=1 if gqa == 3 else 0, n_res=5)
    q = _randn(gen, B, H * gqa, d)
    want = ref.decode_attention_pq_ref(q, c)
    got = decode_attention_pq(q, c, num_splits=3, block_n=16)
    assert got.shape == q.shape and torch.isfinite(got).all()
    assert _rel(got, want) < ATTN_RTOL


@pytest.mark.parametrize("per_head,permuted,gqa", [(True, False, 3), (False, True, 1), (True, True, 2)])
def test_decode_attention_pq_per_head_and_key_order(per_head, permuted, gqa):
    gen = _gen(40 + gqa)
    order = torch.randperm(16, generator=gen).to(DEV) if permuted else None
    c = pq_cache(gen, 16, 8, 6, t=37, n_sink=1, n_res=5, per_head=per_head, key_order=order)
    q = _randn(gen, B, H * gqa, 16)
    want = ref.decode_attention_pq_ref(q, c)
    got = decode_attention_pq(q, c, num_splits=3, block_n=16)
    assert got.shape == q.shape and torch.isfinite(got).all()
    assert _rel(got, want) < ATTN_RTOL


def test_decode_attention_edge_segments():
    """Nothing packed yet (fp16 tokens only), and packed tokens only; the softmax scale is honoured."""
    gen = _gen(50)
    q = _randn(gen, B, H, 16)
    c = cq_cache(gen, 16, 4, 4, t=0, n_sink=1, n_res=4)
    assert _rel(decode_attention_cq(q, c), ref.decode_attention_cq_ref(q, c)) < ATTN_RTOL
    p = pq_cache(gen, 16, 8, 4, t=19, n_sink=0, n_res=0)
    s = 0.5 / math.sqrt(16)
    assert _rel(decode_attention_pq(q, p, sm_scale=s), ref.decode_attention_pq_ref(q, p, sm_scale=s)) < ATTN_RTOL
    assert _rel(ref.decode_attention_pq_ref(q, p, sm_scale=s), ref.decode_attention_pq_ref(q, p)) > 1e-3


@pytest.mark.parametrize("kind, gqa", [("cq", 1), ("cq", 3), ("pq", 2)])
def test_decode_attention_device_counts(kind, gqa):
    """Counts read from the device (``lens``: the launch a CUDA graph captures): one plan made for the capacity,
    with stale host counts the kernels must ignore, gives the reference's attention at every fill (nothing packed,
    a fill that is not a multiple of the block, the full capacity)."""
    gen = _gen(60 + gqa)
    q = _randn(gen, B, H * gqa, 16)
    decode, reference = ((decode_attention_cq, ref.decode_attention_cq_ref) if kind == "cq" else
                         (decode_attention_pq, ref.decode_attention_pq_ref))
    for t, n_res in ((0, 3), (21, 0), (53, 16)):
        c = (cq_cache(gen, 16, 4, 6, t, 1, n_res) if kind == "cq" else pq_cache(gen, 16, 8, 6, t, 0, n_res))
        lens = torch.tensor([t, n_res, 0, 0], dtype=torch.int64, device=DEV)
        stale = dataclasses.replace(c, n_packed=7, n_res=1)
        assert _rel(decode(q, stale, block_n=16, lens=lens), reference(q, c)) < ATTN_RTOL


# ----------------------------------------------------------------------------------------------- pq tensor cores
def pq128_cache(gen, h, t, tmax, n_sink, n_res, per_head=False, permuted=False):
    """A MILLION cache at head dim 128 (64 subspaces of 2 channels, 8-bit codes) with ``h`` KV heads."""
    shape = (h,) * per_head + (64, 256, 2)
    ck, cv = (torch.randn(*shape, generator=gen).to(DEV) for _ in range(2))
    order = torch.randperm(128, generator=gen).to(DEV) if permuted else None
    c = ref.empty_vq_cache("pq", B, h, tmax, 8, ck, cv, n_sink=n_sink, max_res=8, key_order=order)
    return _fill(c, gen, t, n_sink, n_res)


def _check_both_programs(decode, reference, q, c):
    """``decode(q, c)`` (the tensor-core program for the packed splits) within 5e-3 of ``reference`` in q's dtype,
    also with the counts on the device (``lens``, stale host counts), and the CUDA-core program (``num_splits`` asked
    for) on the same cache within ``ATTN_RTOL``."""
    want = reference(q.float(), c)
    got = decode(q, c)
    assert got.dtype == q.dtype and _rel(got, want) < 5e-3
    lens = torch.tensor([c.n_packed, c.n_res, 0, 0], dtype=torch.int64, device=DEV)
    assert _rel(decode(q, dataclasses.replace(c, n_packed=3, n_res=0), lens=lens), want) < 5e-3
    assert _rel(decode(q, c, num_splits=3), want) < ATTN_RTOL


def test_pq_mma_maps_give_each_thread_adjacent_code_bytes():
    """``decode_mma_pq``'s operand orders: permutations of the 128 channels; the 16 key pairs a thread holds (lane
    ``r = l & 3``: pairs ``r + 4 a + 8 b``) are subspaces ``16 r ..``, 16 adjacent code bytes, and the 16 value
    columns of lane group ``g`` (``g + 8 j``) are channels ``16 g ..``, the entries of 8 adjacent code bytes."""
    from kvq_kernels.decode_mma_pq import pq_key_map, pq_value_map

    i = torch.arange(128)
    kch, vch = pq_key_map(i), pq_value_map(i)
    assert torch.equal(kch.sort().values, i) and torch.equal(vch.sort().values, i)
    assert torch.equal(kch[1::2] - kch[0::2], torch.ones(64, dtype=torch.long))  # a register is one entry
    for r in range(4):
        pairs = torch.tensor([r + 4 * a + 8 * b for a in range(2) for b in range(8)])
        assert torch.equal((kch[2 * pairs] // 2).sort().values, torch.arange(16 * r, 16 * r + 16))
    for g in range(8):
        assert torch.equal(vch[g + 8 * torch.arange(16)].sort().values, torch.arange(16 * g, 16 * g + 16))


@pytest.mark.parametrize("g, per_head, permuted", [(3, False, False), (4, True, True), (16, False, True)])
def test_pq_mma_reference(g, per_head, permuted):
    """``pq_mma_reference`` (the program's operand orders, fp16 query, codebooks and probabilities) gives the
    reference's attention over the packed tokens."""
    from kvq_kernels.decode_mma_pq import pq_mma_reference

    gen = _gen(60 + g)
    c = pq128_cache(gen, 2, 70, 80, 0, 0, per_head, permuted)
    q = _randn(gen, B, 2 * g, 128)
    want = ref.decode_attention_pq_ref(q, c)
    assert _rel(pq_mma_reference(q, c), want) < 5e-3
    c.k_codes[:, :, :70] = c.k_codes[:, :, :70].roll(1, dims=-1)  # another channel order: not the same attention
    assert _rel(pq_mma_reference(q, c), want) > 5e-2


def test_pq_mma_program_compiles_with_only_its_gathers_in_its_loop():
    """The program compiled for sm_90: its token loop's 64 MMAs and 128 shared-memory gathers (4 tokens x 16 key
    entries and 8 x 8 value entries a thread), and no shared store or barrier that Triton made (nothing else touches
    the codebooks' bytes while they are read)."""
    from conftest import check_gluon_loop

    check_gluon_loop("decode_mma_pq", ["pq_compiled_counts(3)", "pq_compiled_counts(16, 4)",
                                       "pq_compiled_counts(4, dyn=True)"], 64, shared_loads=128)


@pytest.mark.skipif(DEV != "cuda", reason="Gluon has no CPU interpreter (the CPU checks: the three tests above)")
@pytest.mark.parametrize("h, g, t, tmax, n_sink, n_res, per_head, permuted, dtype", [
    (3, 4, 300, 512, 1, 5, False, False, torch.float16), (2, 3, 1000, 1030, 0, 3, True, True, torch.bfloat16),
    (1, 16, 4096, 4096, 1, 0, True, False, torch.float16), (2, 8, 257, 300, 0, 0, False, True, torch.float16),
    (1, 2, 9000, 9001, 1, 8, False, False, torch.float16)])
def test_decode_attention_pq_mma(h, g, t, tmax, n_sink, n_res, per_head, permuted, dtype):
    """MILLION GQA at head dim 128 on a GPU through ``decode_mma_pq``'s program (``PQ_MMA`` on, this kernel's fp16
    segments): the reference's attention, shared and per-head codebooks, a key channel order, odd counts."""
    from kvq_kernels import pq_decode
    from kvq_kernels.decode_mma_pq import pq_mma_supported

    assert pq_decode.PQ_MMA
    gen = _gen(3000 + h + g + t)
    c = pq128_cache(gen, h, t, tmax, n_sink, n_res, per_head, permuted)
    q = _randn(gen, B, h * g, 128).to(dtype)
    assert pq_mma_supported(q, c)
    _check_both_programs(decode_attention_pq, ref.decode_attention_pq_ref, q, c)


# ----------------------------------------------------------------------------------------------- cq tensor cores
def cq128_cache(gen, h, t, tmax, n_sink, n_res, pre_rope=True):
    """A CQ cache at head dim 128 (32 groups of 4 channels, 8-bit codes, per-head codebooks), ``h`` KV heads."""
    ck, cv = (torch.randn(h, 32, 256, 4, generator=gen).to(DEV) for _ in range(2))
    c = ref.empty_vq_cache("cq", B, h, tmax, 8, ck, cv, n_sink=n_sink, max_res=8, pre_rope=pre_rope,
                           rope_theta=10000.0)
    return _fill(c, gen, t, n_sink, n_res)


def test_cq_mma_maps_keep_each_group_in_one_thread():
    """``decode_mma_cq``'s operand orders: each 4-channel group's key rows are two B registers of one lane
    (``kvq_key_map``: lane ``t = (k >> 1) & 3``), with its rotation partner group in the same lane; each group's
    value columns belong to one lane group (``n & 7``)."""
    from kvq_kernels.decode_mma_cq import cq_maps

    kch, vch = cq_maps("cpu").long()
    k = torch.arange(128)
    lane = (k >> 1) & 3
    for grp in range(32):
        rows = k[kch // 4 == grp]
        partner = k[kch // 4 == (grp + 16) % 32]
        assert len(rows) == 4 and len(set(lane[rows].tolist()) | set(lane[partner].tolist())) == 1
        assert len(set((k[vch // 4 == grp] & 7).tolist())) == 1


@pytest.mark.parametrize("g, pre_rope, n_sink, t", [(3, True, 1, 70), (4, False, 0, 64), (16, True, 0, 100)])
def test_cq_mma_reference(g, pre_rope, n_sink, t):
    """``cq_mma_reference`` (the program's operand orders, its two rotations from fp16 tables, fp16 operands) gives
    the reference's attention over the packed tokens (positions from ``n_sink``)."""
    from kvq_kernels.decode_mma_cq import cq_mma_reference
    from kvq_kernels.reference import attention_ref

    gen = _gen(70 + g)
    c = cq128_cache(gen, 2, t, 110, n_sink, 0, pre_rope)
    q = _randn(gen, B, 2 * g, 128)
    k, v = ref.dequantize_cq_cache(c)  # sink + packed, keys post-RoPE
    want = attention_ref(q, k[:, :, n_sink:], v[:, :, n_sink:])
    assert _rel(cq_mma_reference(q, c), want) < 5e-3
    c.k_codes[:, :, :t] = c.k_codes[:, :, :t].roll(1, dims=-1)  # other groups: not the same attention
    assert _rel(cq_mma_reference(q, c), want) > 5e-2


def test_cq_mma_program_compiles_with_only_its_gathers_in_its_loop():
    """The program compiled for sm_90: its token loop's 64 MMAs and 64 shared-memory gathers of 8 bytes (4 tokens x
    8 key entries and 8 x 4 value entries a thread), and no shared store or barrier that Triton made."""
    from conftest import check_gluon_loop

    check_gluon_loop("decode_mma_cq", ["cq_compiled_counts(3)", "cq_compiled_counts(16, 4)",
                                       "cq_compiled_counts(4, pf=False)", "cq_compiled_counts(4, dyn=True)"], 64,
                     shared_loads=64)


@pytest.mark.skipif(DEV != "cuda", reason="Gluon has no CPU interpreter (the CPU checks: the three tests above)")
@pytest.mark.parametrize("h, g, t, tmax, n_sink, n_res, pre_rope, dtype, pf", [
    (3, 4, 300, 512, 1, 5, True, torch.float16, True), (2, 3, 1000, 1030, 0, 3, True, torch.bfloat16, False),
    (1, 16, 4096, 4096, 1, 0, False, torch.float16, True), (2, 8, 257, 300, 0, 0, True, torch.float16, True),
    (1, 2, 9000, 9001, 1, 8, True, torch.float16, False)])
def test_decode_attention_cq_mma(h, g, t, tmax, n_sink, n_res, pre_rope, dtype, pf, monkeypatch):
    """CQ-4c8b GQA at head dim 128 on a GPU through ``decode_mma_cq``'s program (``CQ_MMA`` on, this kernel's fp16
    segments): the reference's attention, pre- and post-RoPE keys, odd counts; ``pf``: the code words a tile ahead
    (``decode_mma_cq.PREFETCH``)."""
    from kvq_kernels import cq_decode, decode_mma_cq
    from kvq_kernels.decode_mma_cq import cq_mma_supported

    assert cq_decode.CQ_MMA
    monkeypatch.setattr(decode_mma_cq, "PREFETCH", pf)
    gen = _gen(4000 + h + g + t)
    c = cq128_cache(gen, h, t, tmax, n_sink, n_res, pre_rope)
    q = _randn(gen, B, h * g, 128).to(dtype)
    assert cq_mma_supported(q, c)
    _check_both_programs(decode_attention_cq, ref.decode_attention_cq_ref, q, c)
