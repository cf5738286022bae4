"""The per-token-vector decode kernel (``kvq_kernels.decode_token``: kvq's ``int`` and ``nf``) against its PyTorch
reference (``kvq_kernels.token_reference``; CPU: Triton's interpreter), and the runtime's int / nf buffers as the
kernel reads them.

Codes, packing and the view of the runtime's buffers must match exactly (``torch.equal``); attention within
``ATTN_RTOL`` relative: 1e-5 under the interpreter (float32 throughout), 2e-3 on a GPU (tf32 ``tl.dot``).
"""

import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses  # noqa: E402

import pytest  # noqa: E402
from conftest import check_gluon_loop, check_word_path, tiny_model  # noqa: E402

pytest.importorskip("triton")

from kvq_kernels.decode_token import decode_attention_token  # noqa: E402
from kvq_kernels.token_reference import (  # noqa: E402
    TokenCache,
    decode_attention_token_ref,
    dequantize_token_cache,
    pack_token_codes,
    quantize_tokens,
    unpack_token_codes,
)

from kvq_cli import load_cache  # noqa: E402
from kvq_cli.hf_attention import cache_kwargs  # noqa: E402
from kvq_cli.methods import make_method  # noqa: E402
from kvq_cli.methods.quant_ops import normal_float_codebook  # noqa: E402
from kvq_cli.runtime.kernel_path import kernel_cache  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ATTN_RTOL = 1e-5 if DEV == "cpu" else 2e-3
B = 2


def _randn(gen, *shape, scale=1.0, shift=0.0):
    return (torch.randn(*shape, generator=gen) * scale + shift).to(DEV)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _cache(gen, h, d, bits, nf, t, n_sink, n_res, tmax=80) -> TokenCache:
    """A cache of ``t`` quantized random tokens (keys off-centre, so int's zero points matter) and random fp16 sink
    and residual tokens."""
    c = TokenCache.empty(B, h, d, tmax, bits, levels=normal_float_codebook(bits) if nf else None, zero=not nf,
                         n_sink=n_sink, max_res=16, device=DEV)
    if t:
        c.append(_randn(gen, B, h, t, d, scale=1.5, shift=0.7), _randn(gen, B, h, t, d, shift=-0.3), 0)
    c.n_packed = t
    c.sink_k.copy_(_randn(gen, B, h, n_sink, d))
    c.sink_v.copy_(_randn(gen, B, h, n_sink, d))
    c.res_k[:, :, :n_res] = _randn(gen, B, h, n_res, d).half()
    c.res_v[:, :, :n_res] = _randn(gen, B, h, n_res, d).half()
    c.n_res = n_res
    return c


# (H, G, D, bits, nf, packed tokens, sink, residual): odd head counts, every G path (one row per program, tl.dot
# rows padded to 16), contexts that are no multiple of the block, with and without sink / residual
SHAPES = [
    (1, 1, 32, 2, False, 45, 0, 0),
    (3, 1, 64, 3, False, 37, 2, 5),
    (3, 2, 128, 4, False, 70, 0, 3),
    (1, 4, 32, 3, False, 21, 4, 0),
    (1, 7, 64, 2, False, 53, 1, 7),
    (3, 7, 32, 4, False, 17, 0, 16),
    (1, 2, 64, 8, False, 39, 2, 2),
    (3, 1, 32, 8, False, 33, 0, 0),
    (1, 1, 64, 4, True, 45, 3, 0),
    (3, 2, 32, 2, True, 29, 0, 4),
    (1, 4, 128, 3, True, 61, 2, 9),
    (3, 7, 64, 4, True, 18, 0, 0),
    (1, 2, 32, 3, True, 47, 1, 1),
    (3, 1, 128, 2, True, 5, 0, 2),
]


@pytest.mark.parametrize("h, g, d, bits, nf, t, n_sink, n_res", SHAPES,
                         ids=[f"H{s[0]}G{s[1]}D{s[2]}-{'nf' if s[4] else 'int'}{s[3]}-t{s[5]}s{s[6]}r{s[7]}"
                              for s in SHAPES])
def test_decode_attention_token(h, g, d, bits, nf, t, n_sink, n_res):
    gen = torch.Generator().manual_seed(h * 1000 + g * 100 + d + bits)
    c = _cache(gen, h, d, bits, nf, t, n_sink, n_res)
    q = _randn(gen, B, h * g, d)
    want = decode_attention_token_ref(q, c)
    for splits in (1, 3):
        assert _rel(decode_attention_token(q, c, num_splits=splits, block_n=16), want) < ATTN_RTOL, splits


@pytest.mark.parametrize("g, nf", [(1, False), (4, False), (2, True)])
def test_decode_attention_token_device_counts(g, nf):
    """Counts read from the device (``lens``, the graph-captured launch): one plan made for the capacity gives the
    reference's attention at every fill (an empty packed segment, a partial block, the full capacity), the host's
    stale counts ignored."""
    gen = torch.Generator().manual_seed(30 + g)
    h, d, tmax = 3, 32, 96
    q = _randn(gen, B, h * g, d)
    for t, n_res in ((0, 3), (13, 1), (45, 5), (96, 16)):
        c = _cache(gen, h, d, 4, nf, t, 2, n_res, tmax=tmax)
        lens = torch.tensor([t, n_res, 0, t], dtype=torch.int64, device=DEV)
        stale = dataclasses.replace(c, n_packed=7, n_res=0)
        got = decode_attention_token(q, stale, block_n=16, lens=lens)
        assert _rel(got, decode_attention_token_ref(q, c)) < ATTN_RTOL, t


@pytest.mark.parametrize("g, d, bits, dtype", [(4, 128, 2, torch.float16), (3, 64, 4, torch.float16),
                                               (2, 64, 1, torch.float16), (1, 64, 2, torch.float32),
                                               (1, 128, 4, torch.float16), (4, 64, 2, torch.float32)])
def test_decode_attention_token_words(g, d, bits, dtype):
    """``int`` codes read as words (``TOKEN_WORDS``, blocks of 32): the reference's attention on a partial last
    block with sink and residual, and the byte-wise path's within the fp16 dots' rounding (float32 dots: the same
    sums of exact codes)."""
    import kvq_kernels.decode_token as dtk
    from kvq_kernels.decode_attention import plain_codes
    from kvq_kernels.pack import words_supported

    assert words_supported(d, bits) and not plain_codes(g > 1, d, 32)  # the shape takes the path
    gen = torch.Generator().manual_seed(500 + g * 10 + d + bits)
    c = _cache(gen, 2, d, bits, False, 83, 2, 5, tmax=128)
    q = _randn(gen, B, 2 * g, d).to(dtype)
    check_word_path(dtk, "TOKEN_WORDS", lambda: decode_attention_token(q, c, num_splits=2, block_n=32),
                    decode_attention_token_ref(q.float(), c), ATTN_RTOL if dtype == torch.float32 else 1e-2,
                    exact=dtype == torch.float32 and g > 1)


@pytest.mark.parametrize("g, t, bits", [(2, 77, 2), (4, 130, 2), (16, 33, 2), (3, 70, 4), (8, 131, 4)])
def test_mma_reference_is_the_token_reference(g, t, bits):
    """``decode_mma``'s algebra in PyTorch (operands made from the stored words in the order of its
    ``operand_maps``, the 1024 offsets, shifts, scales and zeros corrected as the program does) gives the
    reference's attention: the maps and corrections that the Gluon program reads are right. The maps are
    permutations, and ``(c << e) | 0x6400`` read as fp16 is ``1024 + 2^e c`` for every code and shift they use."""
    from kvq_kernels.decode_mma import mma_reference, operand_maps

    k = torch.arange(128)
    kch, ke, vch, ve = operand_maps(bits, "cpu").long()
    assert torch.equal(kch.sort().values, k) and torch.equal(vch.sort().values, k)
    for e in set(ke.tolist()) | set(ve.tolist()):
        c = torch.arange(1 << bits)
        got = ((c << e) | 0x6400).to(torch.int16).view(torch.float16).float()
        assert torch.equal(got, 1024.0 + c.float() * 2 ** e), e
    gen = torch.Generator().manual_seed(900 + g + t + bits)
    c = _cache(gen, 3, 128, bits, False, t, 0, 0, tmax=160)
    q = _randn(gen, B, 3 * g, 128)
    assert _rel(mma_reference(q, c), decode_attention_token_ref(q, c)) < 2e-3


def test_mma_program_compiles_without_shared_memory_in_its_loop():
    """The Gluon program compiles for sm_90 on any machine, and its token loop has its 64 MMAs (48 with the value
    product transposed, G <= 8), no shared-memory instruction or barrier and no integer-to-float conversion (the
    point of making the operands in registers). (``conftest.check_gluon_loop``)."""
    check_gluon_loop("decode_mma", ["compiled_counts(16, True, 2)", "compiled_counts(16, False, 4)"], 64)
    # G <= 8, the value product transposed: half the value MMAs (32 for the scores, 16 for the values)
    check_gluon_loop("decode_mma", ["compiled_counts(3, True, 2, swap=True)", "compiled_counts(8, False, 2, swap=True)",
                                    "compiled_counts(4, True, 4, swap=True)"], 48)


def test_mma_programs_an_sm_follow_the_registers():
    """The split plan's programs an SM are as many as fit in an SM's 64K registers (allocated 256 a warp), its 64
    warps and 32 programs: the register counts the H200 sweeps saw (168 for int, 248 for kivi, 2 warps) and the
    bounds; the plan's splits keep those programs in one wave; a fixed ``PROGRAMS_PER_SM`` wins."""
    from kvq_kernels import decode_mma

    assert decode_mma.resident(168, 2) == 6 and decode_mma.resident(216, 2) == 4
    assert decode_mma.resident(248, 2) == 4 and decode_mma.resident(168, 4) == 3
    assert decode_mma.resident(255, 8) == 1 and decode_mma.resident(16, 2) == 32 and decode_mma.resident(16, 4) == 16

    def fits(k, regs, warps):
        return k * warps * -(-regs * 32 // 256) * 256 <= 65536 and k * warps <= 64 and k <= 32

    for regs in range(8, 256, 7):
        for warps in (1, 2, 4, 8):
            n = decode_mma.resident(regs, warps)
            assert fits(n, regs, warps) and not fits(n + 1, regs, warps)
    # the Gluon programs' plan keeps its grid in one wave of resident programs (4 SMs on the CPU)
    from kvq_kernels.decode_attention import split_plan

    q = torch.zeros(2, 8, 128)
    for rows, programs in ((3, 4), (8, 4), (5, 6), (64, 4), (40, 1)):
        one = split_plan(q, rows, 4096, 64, None, programs, one_wave=True)[1] - 1
        assert rows * one <= max(rows, 4 * programs) and rows * (one + 1) > 4 * programs
        assert split_plan(q, rows, 4096, 64, None, programs)[1] - 1 == -(-4 * programs // rows)
    old = decode_mma.PROGRAMS_PER_SM
    try:
        decode_mma.PROGRAMS_PER_SM = 3
        assert decode_mma.program_split(None, {}, "cpu", None, 16) == (decode_mma.WARPS * 16, 3)
    finally:
        decode_mma.PROGRAMS_PER_SM = old


@pytest.mark.skipif(DEV != "cuda", reason="Gluon has no CPU interpreter (the CPU checks: the two tests above)")
@pytest.mark.parametrize("h, g, t, tmax, n_sink, n_res, dtype, bits", [
    (3, 4, 77, 128, 2, 5, torch.float16, 2),      # one partial tile
    (2, 16, 1000, 1024, 0, 3, torch.bfloat16, 2),  # 16 query heads, partial last tile
    (1, 3, 300, 300, 1, 0, torch.float16, 2),     # a capacity that is no multiple of the tile
    (2, 2, 4096, 4096, 0, 0, torch.float16, 2),   # many splits
    (3, 4, 77, 128, 2, 5, torch.float16, 4),
    (1, 5, 1000, 1030, 0, 3, torch.bfloat16, 4),
    (2, 8, 4096, 4096, 1, 0, torch.float16, 4)])
@pytest.mark.parametrize("swap", [False, True])
def test_decode_attention_token_mma(h, g, t, tmax, n_sink, n_res, dtype, bits, swap, monkeypatch):
    """int 2- and 4-bit GQA at head dim 128 on a GPU runs ``decode_mma``'s program (with this kernel's fp16
    segments): the reference's attention, with the counts on the host and on the device; ``swap``: with the value
    product transposed where G <= 8 (``SWAP_PV``, off by default)."""
    from kvq_kernels import decode_mma
    from kvq_kernels.decode_mma import mma_supported

    monkeypatch.setattr(decode_mma, "SWAP_PV", swap)

    gen = torch.Generator().manual_seed(1000 + h + g + t)
    c = _cache(gen, h, 128, bits, False, t, n_sink, n_res, tmax=tmax)
    q = _randn(gen, B, h * g, 128).to(dtype)
    assert mma_supported(q, c)
    want = decode_attention_token_ref(q.float(), c)
    assert _rel(decode_attention_token(q, c), want) < 5e-3
    lens = torch.tensor([t, n_res, 0, t], dtype=torch.int64, device=DEV)
    assert _rel(decode_attention_token(q, dataclasses.replace(c, n_packed=7, n_res=0), lens=lens), want) < 5e-3


@pytest.mark.parametrize("bits, g, t", [(4, 4, 77), (2, 16, 130), (4, 3, 64)])
def test_nf_mma_reference_is_the_token_reference(bits, g, t):
    """``decode_mma_nf``'s algebra in PyTorch (key and value operands of fp16 levels in ``kvq_maps`` order, token
    scales on the scores and on ``p``) gives the reference's attention over an ``nf`` cache's packed tokens."""
    from kvq_kernels.decode_mma_nf import nf_mma_reference

    gen = torch.Generator().manual_seed(60 + bits + g + t)
    c = _cache(gen, 2, 128, bits, True, t, 0, 0, tmax=160)
    q = _randn(gen, B, 2 * g, 128)
    assert _rel(nf_mma_reference(q, c), decode_attention_token_ref(q, c)) < 2e-3


def test_nf_mma_program_compiles_without_shared_memory_in_its_loop():
    """The nf Gluon program compiles for sm_90 on any machine, 2- and 4-bit; its token loop has 64 MMAs and no
    shared-memory instruction, barrier or int-to-float conversion (the levels are lane shuffles)."""
    check_gluon_loop("decode_mma_nf", ["nf_compiled_counts(4, True, 4)", "nf_compiled_counts(16, False, 2)",
                                       "nf_compiled_counts(4, True, 2, nib=True)"], 64)


@pytest.mark.skipif(DEV != "cuda", reason="Gluon has no CPU interpreter (the CPU checks: the two tests above)")
@pytest.mark.parametrize("h, g, t, tmax, n_sink, n_res, dtype, bits, nib", [
    (3, 4, 77, 128, 2, 5, torch.float16, 4, False), (2, 16, 1000, 1030, 0, 3, torch.bfloat16, 4, False),
    (1, 3, 300, 300, 1, 0, torch.float16, 2, False), (2, 8, 4096, 4096, 1, 0, torch.float16, 2, False),
    (1, 3, 300, 300, 1, 0, torch.float16, 2, True), (2, 8, 4096, 4096, 1, 2, torch.float16, 2, True)])
def test_decode_attention_token_nf_mma(h, g, t, tmax, n_sink, n_res, dtype, bits, nib, monkeypatch):
    """nf 2- and 4-bit GQA at head dim 128 on a GPU through ``decode_mma_nf``'s program (``NF_MMA`` on, with this
    kernel's fp16 segments): the reference's attention, counts on the host and on the device; ``nib``: 2-bit values
    looked up from interleaved nibbles (``decode_mma_kvquant.VALUE_NIBBLES``; its PTX is checked on the CPU by
    ``test_kernels.test_value_nibbles_look_up_each_code_pair``). 2-bit with device counts is the variant that loads
    each tile a tile ahead (``decode_mma_nf.PREFETCH``)."""
    import kvq_kernels.decode_mma_kvquant as km
    import kvq_kernels.decode_token as dtk
    from kvq_kernels.decode_mma_nf import nf_mma_supported

    monkeypatch.setattr(dtk, "NF_MMA", True)
    monkeypatch.setattr(km, "VALUE_NIBBLES", nib)
    gen = torch.Generator().manual_seed(2000 + h + g + t)
    c = _cache(gen, h, 128, bits, True, t, n_sink, n_res, tmax=tmax)
    q = _randn(gen, B, h * g, 128).to(dtype)
    assert nf_mma_supported(q, c)
    want = decode_attention_token_ref(q.float(), c)
    assert _rel(decode_attention_token(q, c), want) < 5e-3
    lens = torch.tensor([t, n_res, 0, t], dtype=torch.int64, device=DEV)
    assert _rel(decode_attention_token(q, dataclasses.replace(c, n_packed=7, n_res=0), lens=lens), want) < 5e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_decode_attention_token_16_bit_queries(dtype):
    gen = torch.Generator().manual_seed(7)
    c = _cache(gen, 2, 64, 4, False, 50, 1, 3)
    q = _randn(gen, B, 2 * 4, 64).to(dtype)
    got = decode_attention_token(q, c, block_n=16)
    assert got.dtype == dtype and _rel(got, decode_attention_token_ref(q.float(), c)) < 1e-2


def test_token_cache_packing_exact():
    """Codes round-trip through the packing at every width; the int quantizer's codes are the uniform grid's."""
    gen = torch.Generator().manual_seed(3)
    for bits in (1, 2, 3, 4, 8):
        codes = torch.randint(0, 1 << bits, (2, 3, 5, 32), generator=gen, dtype=torch.uint8)
        packed = pack_token_codes(codes, bits)
        assert packed.shape[-1] == 32 * bits // 8 and torch.equal(unpack_token_codes(packed, bits, 32), codes)
    x = torch.randn(2, 3, 5, 32, generator=gen)
    packed, scale, zero = quantize_tokens(x, 3)
    want = torch.round((x - zero.float()[..., None]) / scale.float()[..., None]).clamp(0, 7).to(torch.uint8)
    assert torch.equal(unpack_token_codes(packed, 3, 32), want)


def test_decode_attention_token_refusals():
    c = _cache(torch.Generator().manual_seed(1), 1, 32, 2, True, 5, 0, 0)
    q = torch.zeros(B, 1, 32, device=DEV)
    with pytest.raises(ValueError, match="levels"):
        decode_attention_token(q, dataclasses.replace(c, levels=c.levels[:3].contiguous()))
    with pytest.raises(ValueError, match="zero"):
        decode_attention_token(q, dataclasses.replace(c, k_zero=c.k_scale))
    with pytest.raises(ValueError, match="-bit codes"):
        TokenCache.empty(1, 1, 32, 8, 5)


def _decode(model, method, ids, new: int, use_kernel: bool):
    """Prefill ``ids[:, :-new]``, then decode the last ``new`` tokens one at a time: (logits, cache)."""
    cache = load_cache(method, model, batch_size=ids.shape[0])
    for layer in cache.layers:
        layer.use_kernel = use_kernel
    with torch.inference_mode():  # as kvq generate runs
        model(ids[:, :-new], **cache_kwargs(model, cache))
        steps = [model(ids[:, t : t + 1], **cache_kwargs(model, cache)).logits for t in range(ids.shape[1] - new,
                                                                                               ids.shape[1])]
    cache.unbind()
    return torch.cat(steps, 1), cache


@pytest.mark.parametrize("spec", [dict(name="int", bits=3, sink=3, residual=4), dict(name="nf", bits=4),
                                  dict(name="int", bits=8, residual=2)], ids=["int3", "nf4", "int8"])
def test_runtime_int_nf_decode_through_the_kernel(spec):
    """The runtime's int / nf layers, read zero-copy by the kernel: the view dequantizes to exactly what the
    method's own decode gives (same bytes, same layout), and decoding through the kernel gives the reference
    path's logits at every step (mean difference under 5e-5, max under 1e-3), every layer-step served by the
    kernel. The two paths sum in different orders, so a later token's 3-bit code can land on the other side of a
    rounding boundary: on a fresh install (numpy 2.4.6, Triton 3.9's interpreter) one logit of int3 moved by 2.8e-4
    (mean 1.3e-5), where earlier installs stayed under 1e-4; a wrong kernel moves them by tenths."""
    model = tiny_model("llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=2)  # D = 32, G = 2
    ids = torch.randint(0, 320, (2, 41), generator=torch.Generator().manual_seed(9))
    method = make_method(**spec)
    got, cache = _decode(model, method, ids, 5, True)
    want, _ = _decode(model, method, ids, 5, False)
    assert (got - want).abs().mean().item() < 5e-5 and (got - want).abs().max().item() < 1e-3
    steps = cache.decode_steps()
    assert steps["reference_steps"] == 0 and steps["kernel_steps"] == 5 * len(cache.layers)
    for layer in cache.layers:
        view = kernel_cache(layer)
        assert isinstance(view, TokenCache) and view.k_packed.data_ptr() == layer.keys_stream.packed.fields[
            "codes"].buf.data_ptr()  # zero-copy
        k, v = dequantize_token_cache(view)
        k_ref, v_ref = layer.read(0, layer.length)
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
