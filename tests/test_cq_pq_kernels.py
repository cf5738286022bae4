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
    for buf in (c.k_codes, c.v_codes):
        codes = torch.randint(0, 1 << c.bits, (B, H, t, n), generator=gen)
        buf[:, :, :t] = ref.pack_vq_codes(codes, c.bits).to(DEV)
    c.sink_k.copy_(_randn(gen, B, H, n_sink, d))
    c.sink_v.copy_(_randn(gen, B, H, n_sink, d))
    c.res_k[:, :, :n_res] = _randn(gen, B, H, n_res, d).half()
    c.res_v[:, :, :n_res] = _randn(gen, B, H, n_res, d).half()
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
