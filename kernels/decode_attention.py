"""Triton decode attention that reads the packed KV cache directly (layout: ``kvq_kernels.reference``).

One query token per sequence: ``q (B, H*G, D)``, post-RoPE. Split-K: grid ``(B*H*G/QPP, n_splits + 1)``, each
program takes ``QPP`` query heads of one KV head (1 for MHA, all G with tensor cores for GQA) and one chunk of
the packed tokens; the last split takes the fp16 sink and residual. The programs (``kvq_kernels.decode_split``)
expand the packed codes in registers, look them up in the codebook, fold the per-channel affine map and
RoPE into per-program tables (kvquant keys are pre-RoPE), and write partial max / sum / output that a reduce
kernel merges. kvquant's per-row sparse outliers are corrections made by two small kernels around them
(``kvq_kernels.decode_outliers``). See ``docs/results/kernels-decode-attention.md`` for what each choice
measured on the H100.

Public functions:
    decode_attention_kvquant(q, cache, sm_scale=None, num_splits=None, block_n=None, num_warps=None) -> out
    decode_attention_kivi(q, cache, sm_scale=None, num_splits=None, block_n=None, num_warps=None) -> out
    dequantize_packed_kvquant(cache, out_k, out_v, offset=0)   packed segment -> fp16 (keys RoPE'd)
    dequantize_packed_kivi(cache, out_k, out_v, offset=0)      (the "dequantize, then SDPA" path)
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import decode_mma_kivi, decode_mma_kvquant
from .decode_outliers import _key_outlier_kernel, _value_outlier_kernel
from .decode_split import VQ_PROGRAMS_PER_SM, _kivi_split_kernel, _kvquant_split_kernel
from .pack import _load_codes_half, words_supported
from .reference import KIVICache, KVQuantCache, cdiv, kivi_group_supported, next_pow2, value_group
from .token_reference import TokenCache

LOG2E = 1.4426950408889634
#: split programs per SM the default plan aims for
PROGRAMS_PER_SM = 8
#: ``tl.dot`` precision of the GQA path for float32 queries (``tf32x3``: three tf32 products, about fp32 accuracy)
DOT_PRECISION = "tf32x3"
#: ... and for fp16 / bf16 queries, whose own mantissas are no wider than tf32's: one tf32 product, 1.4-2x faster
#: at 128K on the H100, 7e-4 relative error against the reference (``bench/probe_dot_precision.py``)
DOT_PRECISION_16 = "tf32"
#: sparse outlier entries a program of the outlier kernels takes at a time, and its warps (128 / 4: 7% faster
#: than 32 / 4 at 128K on the H100, the best of five shapes; ``bench/probe_kvquant_ablations.py``)
OUTLIER_CHUNK = 128
OUTLIER_WARPS = 4
#: timing ablations of the kvquant kernel (wrong results): 1 = no RoPE, 2 = no codebook lookup
ABLATE = 0
#: fp16 / bf16 queries: the ``tl.dot`` operands rounded to fp16 (fp16 tensor-core MMA, float32 accumulation)
#: instead of one-pass tf32. H200, 128K, Llama-3-8B heads: kivi-2b 321 -> 195 us, kvquant-2b-1% 830 -> 647 us
#: (``bench/probe_decode_variants.py``; the dequantized values and the scaled query rounded to fp16 add about
#: 5e-4 relative error, as the 16-bit attention they replace). MHA programs (no dots) are unchanged.
F16_DOTS = True
#: one query head per program (MHA) through ``tl.dot`` too (padded to 16 rows) instead of CUDA-core tiles
FORCE_DOT = False
#: software-pipelining stages of the split programs (None: Triton's default)
NUM_STAGES = None
#: a register cap per thread for the split programs (None: the compiler's choice; a probe switch: fewer registers
#: let more programs share an SM)
MAXNREG = None
#: an experiment for the GQA fp16 dots (``bench/probe_decode_variants.py``; not yet timed on a GPU): 1 computes
#: the scores as ``k q^T`` (the dequantized key tile as the MMA's first operand, which Hopper can read from
#: registers, instead of staging it through shared memory as the second), 2 also the values as ``v^T p^T``. 0: off.
SWAP_AB = 0
#: kivi codes read as 32-bit words and made floats by bit tricks (``decode_split._kivi_words_loop``) where the
#: head holds whole words per half; False: the byte/join-tree expansion and int-to-float conversions
KIVI_WORDS = True
#: ... with the next block's loads issued before this block's math (register double-buffering)
KIVI_PREFETCH = True
#: 2-bit KIVI GQA at head dim 128 by ``decode_mma_kivi``'s Gluon program (H200, Llama-3-8B heads: 1.18-1.35x SDPA
#: at 128K and 1M, batch 1 and 8, against 0.62-0.74x for the ``tl.dot`` program; session 12)
KIVI_MMA = True
#: KVQuant GQA (2- or 4-bit keys and values) at head dim 128 by ``decode_mma_kvquant``'s Gluon program (H200,
#: Llama-3-8B heads, 2-bit: 0.89x SDPA at 128K and 1.16x at 1M without outliers, 2.7x the ``tl.dot`` program; with
#: 1% outliers 0.51x against 0.24x; sessions 13-14)
KVQ_MMA = True


# ----------------------------------------------------------------------------------------------- RoPE tables
def _version(t: Tensor) -> int:
    """``t``'s in-place version, for the caches below (inference-mode tensors keep none: taken as unchanged)."""
    return 0 if t.is_inference() else t._version


_CACHED: dict = {}
_TABLES: dict = {}


def _cached(key: tuple, srcs: tuple, make):
    """``make()`` kept per ``key`` while the source tensors ``srcs`` are the same objects at the same version (the
    host-side constants of a decode step: made once, not every step)."""
    ver = tuple(_version(s) for s in srcs)
    hit = _CACHED.get(key)
    if hit is None or any(a is not b for a, b in zip(hit[0], srcs, strict=True)) or hit[1] != ver:
        if len(_CACHED) > 256:
            _CACHED.clear()
        hit = _CACHED[key] = (srcs, ver, make())
    return hit[2]


def _frequencies(cache: KVQuantCache, device) -> Tensor:
    """The cache's ``inv_freq`` on ``device`` (float32, contiguous), one tensor per distinct source."""
    src = cache.inv_freq
    if src is not None and src.device == torch.device(device) and src.dtype == torch.float32 and src.is_contiguous():
        return src
    if src is None:
        return _cached(("theta", cache.rope_theta, cache.head_dim, str(device)), (),
                       lambda: cache.rope_frequencies(device))
    return _cached(("freqs", id(src), str(device)), (src,), lambda: cache.rope_frequencies(device))


def rope_block_table(invf: Tensor, block_n: int, rows: int) -> Tensor:
    """``(2, R >= rows, D/2)`` float32: cos and sin of ``r * block_n * invf`` (angles in float64, then rounded).

    Cached per ``invf`` tensor (its identity and version) and ``block_n``; grows by doubling."""
    key = (invf.data_ptr(), str(invf.device), block_n)
    hit = _TABLES.get(key)
    if hit is not None and hit[0] is invf and hit[1] == _version(invf) and hit[2].shape[1] >= rows:
        return hit[2]
    r = max(64, next_pow2(rows))
    ang = (torch.arange(r, dtype=torch.float64, device=invf.device) * block_n)[:, None] * invf.double()[None, :]
    tab = torch.stack([ang.cos(), ang.sin()]).float().contiguous()
    if len(_TABLES) > 64:
        _TABLES.clear()
    _TABLES[key] = (invf, _version(invf), tab)
    return tab


def key_affine(cache: KVQuantCache) -> tuple[Tensor, Tensor]:
    """Centre ``(lo + hi) / 2`` and half-range ``(hi - lo) / 2`` ``(H, D)`` of the key thresholds, made once per
    threshold tensors (their identity and version: a decode step should not spend launches on constants)."""
    lo, hi = cache.lo, cache.hi
    return _cached(("key affine", id(lo), id(hi)), (lo, hi),
                   lambda: (((lo + hi) / 2).contiguous(), ((hi - lo) / 2).contiguous()))


# ----------------------------------------------------------------------------------------------- reduce
@triton.jit
def _reduce_kernel(MP, LP, AP, O, sob, soh, HQ, NSP, D: tl.constexpr, NSP_PAD: tl.constexpr):
    pid = tl.program_id(0)  # (b, query head)
    s = tl.arange(0, NSP_PAD)
    smask = s < NSP
    prow = pid.to(tl.int64) * NSP + s
    m = tl.load(MP + prow, mask=smask, other=-float("inf"))
    l = tl.load(LP + prow, mask=smask, other=0.0)
    mx = tl.max(m, axis=0)
    w = tl.where(m > -float("inf"), tl.exp2(m - mx), 0.0)
    c = tl.arange(0, D)
    acc = tl.load(AP + prow[:, None] * D + c[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(w[:, None] * acc, axis=0) / tl.sum(w * l, axis=0)
    tl.store(O + (pid // HQ) * sob + (pid % HQ) * soh + c, out.to(O.dtype.element_ty))


# ----------------------------------------------------------------------------------------------- wrappers
def _num_sms(device: torch.device) -> int:
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else 4


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


#: (block_n, num_warps) of the split programs when the caller gives none, per family and path (one query row per
#: program, or tl.dot rows): H200, 128K, batch 1, D = 128, the fastest of 16 or 32 tokens by 1, 2 or 4 warps
#: (session 10, ``bench/probe_decode_variants.py``, ``raw/decode-variants-session10-warps*.json``). Fewer warps
#: mean fewer cross-warp reductions and barriers a block and more programs an SM; kvquant's tiles need more.
DEFAULT_BLOCKS = {
    ("kivi", False, 2): (32, 1), ("kivi", False, 4): (32, 2), ("kivi", True, 2): (32, 2), ("kivi", True, 4): (32, 4),
    ("int", False): (16, 1), ("int", True): (32, 1), ("nf", False): (16, 1), ("nf", True): (32, 4),
    ("kvquant", False): (16, 2), ("kvquant", True): (32, 4),
}


def _default_block(dot: bool, cache, kivi: bool, block_n: int | None, num_warps: int | None) -> tuple[int, int]:
    """(block_n, num_warps): ``DEFAULT_BLOCKS`` for what the caller leaves out (kivi: a block lies in one key
    group; kivi by code width, 1-2 bits as 2, 3-4 as 4)."""
    if kivi:
        key = ("kivi", dot, 2 if cache.bits <= 2 else 4)
    elif isinstance(cache, TokenCache):
        key = ("int" if cache.levels is None else "nf", dot)
    else:
        key = ("kvquant", dot)
    bn, nw = DEFAULT_BLOCKS[key]
    block_n = bn if block_n is None else block_n
    if dot:
        block_n = max(16, block_n)
    if kivi:
        block_n = min(block_n, cache.group)
    return block_n, nw if num_warps is None else num_warps


def plain_codes(dot: bool, d: int, block_n: int) -> bool:
    """Whether the split programs load codes bytewise (``decode_split._codes``): the ``tl.dot`` programs do,
    except at ``D >= 64`` with ``block_n >= 32``, the shapes where the faster join-tree expansion was verified
    on the H100 for 1-4 bits and G in {2, 3, 4, 7}; elsewhere it was mis-compiled (results doc)."""
    return dot and (d < 64 or block_n < 32)


def kivi_words(meta: dict, d: int, bits: int, group: int) -> bool:
    """Whether the kivi programs read codes as words (``KIVI_WORDS``): where the halves are whole words, each word
    lies in one value group (``32 / bits <= value_group``), the codes are not read bytewise (``plain_codes``), and
    for the ``tl.dot`` programs at 1-2 bits only (4-bit words measured slower there, results doc)."""
    return (KIVI_WORDS and words_supported(d, bits) and 32 // bits <= value_group(d, group) and not meta["PLAIN"]
            and (not meta["DOT"] or bits <= 2))


def check_kivi_group(group: int) -> None:
    if not kivi_group_supported(group):
        raise ValueError(f"the kivi kernels take groups that are powers of two >= 16, not {group}")


def check_query(q: Tensor, heads: int, d: int) -> int:
    """Validate ``q (B, H*G, D)`` (unit stride in D) and return G."""
    if q.dim() != 3 or q.shape[-1] != d or q.shape[1] % heads:
        raise ValueError(f"q must be (B, H*G, {d}) with H={heads}, got {tuple(q.shape)}")
    if q.stride(-1) != 1:
        raise ValueError("q must be contiguous in its last dim")
    return q.shape[1] // heads


def split_plan(q: Tensor, rows: int, n_packed: int, block_n: int, num_splits: int | None, programs_per_sm: int,
               one_wave: bool = False):
    """Split-K plan over the packed tokens for ``rows`` programs per split (``programs_per_sm`` programs per
    SM by default): (tokens per split, splits + 1 for the fp16 sink/residual segments, partial buffers
    ``m, l (B*Hq, NSP)`` and ``acc (B*Hq, NSP, D)`` float32). ``one_wave``: ``programs_per_sm`` is what an SM holds
    at once, so the splits are rounded down to keep the grid in one wave (rounding up, at batch 8 and 8 KV heads,
    left a second wave of 48 programs after 528 and nearly doubled the time)."""
    b, hq, d = q.shape
    nblocks = cdiv(n_packed, block_n)
    per, nsplit = block_n, 0
    if nblocks:
        if num_splits is None:
            slots = programs_per_sm * _num_sms(q.device)
            num_splits = slots // rows if one_wave else cdiv(slots, rows)
        num_splits = max(1, min(num_splits, nblocks))
        per = cdiv(nblocks, num_splits) * block_n
        nsplit = cdiv(n_packed, per)
    nsp = nsplit + 1  # the last split does the fp16 sink and residual segments
    mp = torch.empty(b * hq, nsp, dtype=torch.float32, device=q.device)
    ap = torch.empty(b * hq, nsp, d, dtype=torch.float32, device=q.device)
    return per, nsp, (mp, torch.empty_like(mp), ap)


def vq_plan(q: Tensor, cache, mma: bool, mma_split, block_n: int, num_splits: int | None, sm_scale: float | None,
            lens: Tensor | None):
    """The split plan of a cq or pq decode (``cache.k_codes (B, H, Tmax, row bytes)``): with ``mma`` the packed
    splits are the Gluon program's, ``mma_split(q, cache, lens)`` its (tokens a tile, programs an SM), in one wave;
    else ``block_n`` tokens a tile of the ``tl.dot`` split program. Counts on the device (``lens``) plan for the
    capacity. -> (tokens a split, splits + 1, partial buffers, log2-domain score scale)."""
    for x in (cache.k_codes, cache.v_codes, cache.sink_k, cache.sink_v, cache.res_k, cache.res_v):
        if not x.is_contiguous():
            raise ValueError("cache buffers must be contiguous")
    b, h, tmax, _ = cache.k_codes.shape
    tile, programs = mma_split(q, cache, lens) if mma else (block_n, VQ_PROGRAMS_PER_SM)
    per, nsp, partials = split_plan(q, b * h, tmax if lens is not None else cache.n_packed, tile, num_splits,
                                    programs, one_wave=mma)
    scale = (1.0 / math.sqrt(cache.head_dim) if sm_scale is None else sm_scale) * LOG2E
    return per, nsp, partials, scale


def _launch_plan(q: Tensor, cache, sm_scale, num_splits, block_n, num_warps, kivi: bool, dyn: bool = False,
                 split: tuple[int, int] | None = None):
    """Shapes, the program layout (QPP query heads per program, MR padded rows, DOT), block sizes, the
    split-K plan, partial-result buffers and the log2-domain score scale. ``dyn``: counts live on the device
    (a graph-captured launch), so the plan is made for the buffers' capacity and the kernel splits the tokens.
    ``split``: (tokens a tile, programs an SM) of a Gluon program that does the packed splits (``decode_mma``); the
    plan is made in its tiles and the grid keeps only the last split (the fp16 segments, ``SEG_ONLY``)."""
    b, h, tmax, _ = cache.k_packed.shape
    d = cache.head_dim
    g = check_query(q, h, d)
    for x in (cache.sink_k, cache.sink_v, cache.res_k, cache.res_v):
        if not x.is_contiguous():
            raise ValueError("fp16 sink/residual buffers must be contiguous")
    dot = (g > 1 or FORCE_DOT) and d >= 32  # tl.dot needs halves >= 16 wide; else one program per query head
    qpp, mr = (g, max(16, next_pow2(g))) if dot else (1, 1)
    block_n, num_warps = _default_block(dot, cache, kivi, block_n, num_warps)
    rows = b * h * (g // qpp)
    tile, programs = split or (block_n, PROGRAMS_PER_SM)
    per, nsp, (mp, lp, ap) = split_plan(q, rows, tmax if dyn else cache.n_packed, tile, num_splits, programs,
                                        one_wave=split is not None)
    scale = (1.0 / math.sqrt(d) if sm_scale is None else sm_scale) * LOG2E
    prec = DOT_PRECISION if q.dtype == torch.float32 else DOT_PRECISION_16
    meta = dict(G=g, QPP=qpp, MR=mr, D=d, BLOCK_N=block_n, DOT=dot, PREC=prec, num_warps=num_warps,
                PLAIN=plain_codes(dot, d, block_n), F16=(1 + SWAP_AB) * (dot and F16_DOTS and q.dtype != torch.float32))
    if NUM_STAGES is not None:
        meta["num_stages"] = NUM_STAGES
    if MAXNREG is not None:
        meta["maxnreg"] = MAXNREG
    if not kivi:  # inline-asm codebook loads on the GPU (the interpreter runs the tl.load form)
        meta["ASM"] = q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
    return (rows, 1 if split else nsp), per, nsp, mp, lp, ap, scale, meta


def _finish(q, nsp, mp, lp, ap):
    out = torch.empty_like(q)
    _reduce_kernel[(q.shape[0] * q.shape[1],)](mp, lp, ap, out, out.stride(0), out.stride(1), q.shape[1], nsp,
                                               D=q.shape[2], NSP_PAD=next_pow2(nsp))
    return out


def _sparse_grid(cache: KVQuantCache, rows, tokens: int) -> tuple[int, int]:
    """One program per sparse block of the first ``tokens`` packed tokens and (batch, KV head) row; the blocks on
    axis 0, whose limit is 2**31 - 1 (axis 1 stops at 65,535 programs: 10M tokens have 163,840 blocks of 64)."""
    b, h = cache.k_packed.shape[:2]
    return cdiv(tokens, rows.block), b * h


def _key_outliers(cache: KVQuantCache, q: Tensor, ka, ksc, invf, tab, block_n: int, scale: float,
                  lens: Tensor | None, sst: int) -> Tensor | None:
    """Score corrections ``(B, Hq, sst)`` float32 of the key outliers (None when there are none)."""
    rows = cache.k_sparse
    if rows is None or (lens is None and cache.n_packed == 0):
        return None
    ds = torch.zeros(q.shape[0], q.shape[1], sst, dtype=torch.float32, device=q.device)
    _key_outlier_kernel[_sparse_grid(cache, rows, sst)](
        q, q.stride(0), q.stride(1), rows.val, rows.idx, rows.ptr, rows.val.shape[-1], rows.ptr.shape[-1],
        cache.k_packed, ka, ksc, cache.ck, invf, tab, tab.shape[1], ds,
        cache.k_packed.shape[1], cache.k_packed.shape[2], cache.n_packed, cache.n_sink, scale, sst,
        q if lens is None else lens,
        G=q.shape[1] // cache.k_packed.shape[1], D=cache.head_dim, BITS=cache.bits_k, SB=rows.block, TB=block_n,
        MAXO=OUTLIER_CHUNK, DYN=lens is not None, num_warps=OUTLIER_WARPS,
    )
    return ds


def _value_outliers(cache: KVQuantCache, q: Tensor, ss: Tensor, mp: Tensor, ap: Tensor, per: int, nsp: int,
                    lens: Tensor | None, sst: int, block_n: int) -> None:
    """Add the value outliers' corrections to the split partials ``ap`` (scores ``ss``, split maxima ``mp``)."""
    rows = cache.v_sparse
    _value_outlier_kernel[_sparse_grid(cache, rows, sst)](
        rows.val, rows.idx, rows.ptr, rows.val.shape[-1], rows.ptr.shape[-1], cache.v_packed, cache.v_min,
        cache.v_scale, cache.cv, ss, mp, ap, cache.k_packed.shape[1], cache.k_packed.shape[2], cache.n_packed, per,
        nsp, sst, q if lens is None else lens, G=q.shape[1] // cache.k_packed.shape[1], D=cache.head_dim,
        BITS=cache.bits_v, SB=rows.block, MAXO=OUTLIER_CHUNK, TB=block_n, DYN=lens is not None,
        num_warps=OUTLIER_WARPS,
    )


def decode_attention_kvquant(q: Tensor, cache: KVQuantCache, sm_scale: float | None = None,
                             num_splits: int | None = None, block_n: int | None = None,
                             num_warps: int | None = None, lens: Tensor | None = None) -> Tensor:
    """Decode attention of post-RoPE ``q (B, H*G, D)`` over a ``KVQuantCache`` -> ``(B, H*G, D)`` in q's dtype.

    ``lens``: the counts on the device (as ``decode_attention_kivi``): one launch plan for the capacity, the
    sparse outliers' programs over every pointer block of it (the pointer arrays must cover the capacity)."""
    dyn = lens is not None
    mma = KVQ_MMA and block_n is None and decode_mma_kvquant.kvq_mma_supported(q, cache)
    spk, spv = cache.k_sparse is not None, cache.v_sparse is not None
    grid, per, nsp, mp, lp, ap, scale, meta = _launch_plan(q, cache, sm_scale, num_splits, block_n, num_warps, False,
                                                           dyn, decode_mma_kvquant.kvq_split(q, cache, lens, spk, spv)
                                                           if mma else None)
    ka, ksc = key_affine(cache)
    invf = _frequencies(cache, q.device)
    bn = meta["BLOCK_N"]
    tmax = cache.k_packed.shape[2]
    sst = tmax if dyn else cache.n_packed  # the score buffers' row length
    tab = rope_block_table(invf, bn, (cache.n_sink + (tmax + cache.res_k.shape[2] if dyn else cache.n_packed
                                                      + cache.n_res)) // bn + 2)
    for rows in (cache.k_sparse, cache.v_sparse):
        if dyn and rows is not None and rows.ptr.shape[-1] < cdiv(tmax, rows.block) + 2:
            raise ValueError("device counts need pointer arrays that cover the capacity")
    sk, rk = cache.sink_k, cache.res_k
    ds = _key_outliers(cache, q, ka, ksc, invf, tab, bn, scale, lens, sst)
    ss = None if cache.v_sparse is None or (not dyn and cache.n_packed == 0) else torch.empty(
        q.shape[0], q.shape[1], sst, dtype=torch.float32, device=q.device)  # scores for the values
    if mma:  # the packed splits by decode_mma_kvquant's program; this one does the fp16 segments
        decode_mma_kvquant.launch_kvq_mma(q, cache, mp, lp, ap, per, nsp, scale, lens, ds, ss, sst)
    _kvquant_split_kernel[grid](
        q, q.stride(0), q.stride(1),
        cache.k_packed, ka, ksc, cache.ck,
        cache.v_packed, cache.v_min, cache.v_scale, cache.cv,
        sk, cache.sink_v, rk, cache.res_v, sk.stride(0), sk.stride(1), rk.stride(0), rk.stride(1),
        invf, tab, tab.shape[1], mp, lp, ap,
        cache.k_packed.shape[1], cache.k_packed.shape[2], cache.n_packed, cache.n_sink, cache.n_res, per, nsp, scale,
        q if ds is None else ds, q if ss is None else ss, sst,  # (q: a placeholder the kernel does not read)
        q if lens is None else lens,
        BITS_K=cache.bits_k, BITS_V=cache.bits_v, ABLATE=ABLATE, SPK=ds is not None, SPV=ss is not None, DYN=dyn,
        SEG_ONLY=mma, **meta,
    )
    if ss is not None:  # (the split plan's tokens: the Gluon program's tiles when it ran)
        _value_outliers(cache, q, ss, mp, ap, per, nsp, lens, sst,
                        decode_mma_kvquant.kvq_tile() if mma else bn)
    return _finish(q, nsp, mp, lp, ap)


def decode_attention_kivi(q: Tensor, cache: KIVICache, sm_scale: float | None = None,
                          num_splits: int | None = None, block_n: int | None = None,
                          num_warps: int | None = None, lens: Tensor | None = None) -> Tensor:
    """Decode attention of post-RoPE ``q (B, H*G, D)`` over a ``KIVICache`` -> ``(B, H*G, D)`` in q's dtype.

    ``lens``: int32 ``[n_packed, n_res]`` on the device, read by the kernel instead of the cache's counts (one
    launch, captured once in a CUDA graph, stays right as the cache grows; its split plan covers the capacity)."""
    check_kivi_group(cache.group)
    dyn = lens is not None
    mma = KIVI_MMA and block_n is None and decode_mma_kivi.kivi_mma_supported(q, cache)
    grid, per, nsp, mp, lp, ap, scale, meta = _launch_plan(q, cache, sm_scale, num_splits, block_n, num_warps, True,
                                                           dyn, decode_mma_kivi.kivi_split(q, cache, lens)
                                                           if mma else None)
    if mma:  # the packed splits by decode_mma_kivi's program; this one does the fp16 segments
        decode_mma_kivi.launch_kivi_mma(q, cache, mp, lp, ap, per, nsp, scale, lens)
    sk, rk = cache.sink_k, cache.res_k
    _kivi_split_kernel[grid](
        q, q.stride(0), q.stride(1),
        cache.k_packed, cache.k_scale, cache.k_zero, cache.v_packed, cache.v_scale, cache.v_zero,
        sk, cache.sink_v, rk, cache.res_v, sk.stride(0), sk.stride(1), rk.stride(0), rk.stride(1),
        mp, lp, ap,
        cache.k_packed.shape[1], cache.k_packed.shape[2], cache.k_scale.shape[2], cache.n_packed, cache.n_sink,
        cache.n_res, per, nsp, scale, lens if dyn else q,  # (q: a placeholder the kernel does not read)
        BITS=cache.bits, KG=cache.group, VG=value_group(cache.head_dim, cache.group), DYN=dyn,
        WORDS=kivi_words(meta, cache.head_dim, cache.bits, cache.group), PREFETCH=KIVI_PREFETCH and not meta["DOT"],
        SEG_ONLY=mma, **meta,
    )
    return _finish(q, nsp, mp, lp, ap)


# ----------------------------------------------------------------------------------------------- dequantize
@triton.jit
def _kvquant_dequant_kernel(
    KP, KA, KSC, CK, VP, VMIN, VSC, CV, INVF, TAB, tab_rows, OK, OV, sob, soh, sot,
    H, Tmax, n_packed, n_sink, offset,
    D: tl.constexpr, BITS_K: tl.constexpr, BITS_V: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(1)  # grid (token blocks, B*H): see ``_sparse_grid``
    b = pid_bh // H
    h = pid_bh % H
    HALF: tl.constexpr = D // 2
    ch = tl.arange(0, HALF)
    t = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = t < n_packed
    row = pid_bh.to(tl.int64) * Tmax + t
    kp = KP + row * (D * BITS_K // 8)
    k1 = tl.load(KA + h * D + ch)[None, :] + tl.load(KSC + h * D + ch)[None, :] * tl.load(
        CK + _load_codes_half(kp, valid, 0, BITS_K, D, BLOCK_N))
    k2 = tl.load(KA + h * D + HALF + ch)[None, :] + tl.load(KSC + h * D + HALF + ch)[None, :] * tl.load(
        CK + _load_codes_half(kp, valid, 1, BITS_K, D, BLOCK_N))
    # position n_sink + t = t0 + (n_sink + j): table angle of the block start t0, small angles in-kernel
    ang = (n_sink + tl.arange(0, BLOCK_N)).to(tl.float32)[:, None] * tl.load(INVF + ch)[None, :]
    cj = tl.cos(ang)
    sj = tl.sin(ang)
    c0 = tl.load(TAB + tl.program_id(0) * HALF + ch)[None, :]
    s0 = tl.load(TAB + (tab_rows + tl.program_id(0)) * HALF + ch)[None, :]
    cs = c0 * cj - s0 * sj
    sn = s0 * cj + c0 * sj
    hs = 0.5 * tl.load(VSC + row, mask=valid, other=0.0).to(tl.float32)
    mn = tl.load(VMIN + row, mask=valid, other=0.0).to(tl.float32) + hs
    vp = VP + row * (D * BITS_V // 8)
    v1 = mn[:, None] + hs[:, None] * tl.load(CV + _load_codes_half(vp, valid, 0, BITS_V, D, BLOCK_N))
    v2 = mn[:, None] + hs[:, None] * tl.load(CV + _load_codes_half(vp, valid, 1, BITS_V, D, BLOCK_N))
    o = b.to(tl.int64) * sob + h.to(tl.int64) * soh + (offset + t).to(tl.int64)[:, None] * sot + ch[None, :]
    tl.store(OK + o, (k1 * cs - k2 * sn).to(OK.dtype.element_ty), mask=valid[:, None])
    tl.store(OK + o + HALF, (k2 * cs + k1 * sn).to(OK.dtype.element_ty), mask=valid[:, None])
    tl.store(OV + o, v1.to(OV.dtype.element_ty), mask=valid[:, None])
    tl.store(OV + o + HALF, v2.to(OV.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _kivi_dequant_kernel(
    KP, KS, KZ, VP, VS, VZ, OK, OV, sob, soh, sot,
    H, Tmax, NGmax, n_packed, offset,
    D: tl.constexpr, BITS: tl.constexpr, KG: tl.constexpr, VG: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(1)  # grid (token blocks, B*H): see ``_sparse_grid``
    b = pid_bh // H
    h = pid_bh % H
    HALF: tl.constexpr = D // 2
    ch = tl.arange(0, HALF)
    t = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    valid = t < n_packed
    row = pid_bh.to(tl.int64) * Tmax + t
    NB: tl.constexpr = D * BITS // 8
    o = b.to(tl.int64) * sob + h.to(tl.int64) * soh + (offset + t).to(tl.int64)[:, None] * sot + ch[None, :]
    goff = (pid_bh.to(tl.int64) * NGmax + t // KG)[:, None] * D + ch[None, :]
    soff = row[:, None] * (D // VG) + ch[None, :] // VG
    for hh in tl.static_range(2):
        kc = _load_codes_half(KP + row * NB, valid, hh, BITS, D, BLOCK_N).to(tl.float32)
        k = tl.load(KZ + goff + hh * HALF, mask=valid[:, None], other=0.0).to(tl.float32) + kc * tl.load(
            KS + goff + hh * HALF, mask=valid[:, None], other=0.0).to(tl.float32)
        tl.store(OK + o + hh * HALF, k.to(OK.dtype.element_ty), mask=valid[:, None])
        vc = _load_codes_half(VP + row * NB, valid, hh, BITS, D, BLOCK_N).to(tl.float32)
        so = soff + (hh * HALF) // VG
        v = tl.load(VZ + so, mask=valid[:, None], other=0.0).to(tl.float32) + vc * tl.load(
            VS + so, mask=valid[:, None], other=0.0).to(tl.float32)
        tl.store(OV + o + hh * HALF, v.to(OV.dtype.element_ty), mask=valid[:, None])


def dequantize_packed_kvquant(cache: KVQuantCache, out_k: Tensor, out_v: Tensor, offset: int = 0,
                              block_n: int = 32) -> None:
    """Write the packed segment, dequantized (keys RoPE'd at positions ``n_sink + i``; sparse outliers not
    applied), into ``out_k / out_v (B, H, >= offset + n_packed, D)`` at token ``offset``."""
    b, h, tmax, _ = cache.k_packed.shape
    d = cache.head_dim
    if cache.n_packed == 0:
        return
    grid = (cdiv(cache.n_packed, block_n), b * h)
    invf = _frequencies(cache, out_k.device)
    tab = rope_block_table(invf, block_n, grid[0] + 1)
    _kvquant_dequant_kernel[grid](
        cache.k_packed, *key_affine(cache), cache.ck, cache.v_packed, cache.v_min, cache.v_scale, cache.cv, invf,
        tab, tab.shape[1], out_k, out_v, out_k.stride(0), out_k.stride(1), out_k.stride(2), h, tmax, cache.n_packed,
        cache.n_sink, offset, D=d, BITS_K=cache.bits_k, BITS_V=cache.bits_v, BLOCK_N=block_n,
    )


def dequantize_packed_kivi(cache: KIVICache, out_k: Tensor, out_v: Tensor, offset: int = 0,
                           block_n: int = 32) -> None:
    """Write the packed segment, dequantized, into ``out_k / out_v (B, H, >= offset + n_packed, D)``."""
    b, h, tmax, _ = cache.k_packed.shape
    d = cache.head_dim
    if cache.n_packed == 0:
        return
    if out_k.stride() != out_v.stride():
        raise ValueError("out_k and out_v must share strides")
    grid = (cdiv(cache.n_packed, block_n), b * h)
    _kivi_dequant_kernel[grid](
        cache.k_packed, cache.k_scale, cache.k_zero, cache.v_packed, cache.v_scale, cache.v_zero, out_k, out_v,
        out_k.stride(0), out_k.stride(1), out_k.stride(2), h, tmax, cache.k_scale.shape[2], cache.n_packed,
        offset, D=d, BITS=cache.bits, KG=cache.group, VG=value_group(d, cache.group),
        BLOCK_N=min(block_n, cache.group),
    )
