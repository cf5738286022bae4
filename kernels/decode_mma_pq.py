"""GQA decode attention over a MILLION product-quantization cache (``PQCache``: M = 64 subspaces of 2 channels,
8-bit codes, head dim 128) with tensor cores for both products and the codebooks gathered from shared memory (Gluon,
sm_80+).

``pq_decode``'s ``tl.dot``-free program scores a token by gathering ``G * M`` entries of per-query score tables out
of L2 and decodes its values by gathering the value codebook through L1, about one entry a cycle an SM (0.07x fp16
SDPA on the H200, ``kernels-decode-attention.md``). Here both codebooks of the program's KV head are copied into
shared memory once (``ck``, ``cv``: 64 x 256 entries of an fp16 pair, 64 KiB each, subspace-major: an entry's bank
is its code's), and every thread gathers the very entries its ``mma.sync`` fragments hold:

* **Keys** (B operand, ``k`` = channel, ``n`` = token). A B register is a pair of adjacent operand rows, and a
  subspace entry is a pair of adjacent channels: one ``ld.shared.b32`` a register, the key decoded with no
  arithmetic, shared by the G query heads. The operand's pair ``p = r + 4 a + 8 b`` (``r`` = lane & 3) is stored
  subspace ``16 r + a + 2 b`` (``pq_key_map``), so a thread's 16 subspaces are 16 adjacent code bytes of a token:
  one 16-byte load. The query is read in that channel order.
* **Values** (B operand, ``k`` = token, ``n`` = channel). Operand column ``n`` is channel ``16 (n & 7) + (n >> 3)``
  (``pq_value_map``): a thread's 16 channels are 8 subspaces, 8 adjacent code bytes of a token. Two tokens'
  entries make two B registers by ``prmt`` (even channels, odd channels).
* Softmax, tiles and outputs as ``decode_mma``'s programs (W warps by 32 tokens, warp ``w`` its own tokens). The
  fp16 sink and residual are ``pq_decode``'s program's last split (``SEG_ONLY``).

Shared memory is read by inline PTX at ``global_smem`` (the symbol Triton names the dynamic shared memory), offsets
``0`` (keys) and ``64 KiB`` (values), which this program fills itself between two barriers: Gluon has no gather from
shared memory. A 128 KiB Gluon allocation after the loop makes the launch request that much; between the fill and
the end of the token loop no Triton-made shared-memory instruction runs (the CPU test checks the loop's PTX), so
nothing else can touch those bytes while they are read.

``pq_mma_reference`` is the algebra in PyTorch (operand orders, fp16 query and probabilities), checked against
``vq_reference`` on the CPU; the CPU tests compile the program for sm_90, the GPU tests run it.

Public: ``pq_mma_supported(q, cache)``, ``pq_split(q, cache)``, ``launch_pq_mma(...)``, ``pq_mma_reference``,
``pq_key_map``, ``pq_value_map``, ``pq_maps``, ``pq_compiled_counts``; for every shared-memory program (this one,
``decode_mma_cq``): ``shared_split``, ``launch_shared``, and in Gluon ``_fill`` and ``_split_out``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import decode_mma as _mma
from .decode_mma import gluon

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    from .decode_mma import (
        _in_split,
        _mma_layout,
        _online,
        _program,
        _query_rows,
        _score_tokens,
        _store_ml,
        _tile_offsets,
        _token_pairs,
        _words_layout,
    )
    from .decode_mma_kvquant import _split4

    _barrier = getattr(gl, "thread_barrier", None) or gl.barrier  # Triton 3.6 / 3.7+

#: warps a program (tiles of 32 W tokens). The codebooks take 128 KiB of shared memory, so an SM holds one program:
#: its warps are all the SM runs
PQ_WARPS = 8
#: bytes of shared memory an SM has (sm_90: 228 KiB, of which a program may take 227)
SMEM_PER_SM = 233472
_SPLIT: dict = {}


def pq_tile() -> int:
    """Tokens a tile."""
    return PQ_WARPS * 32


# ----------------------------------------------------------------------------------------------- index maps
def pq_key_map(k: Tensor) -> Tensor:
    """Stored key channel of key operand row ``k`` (0..127): pair ``p = k >> 1 = r + 4 a + 8 b`` is subspace
    ``16 r + a + 2 b``, ``k & 1`` its channel."""
    p = k >> 1
    r, a, b = p & 3, (p >> 2) & 1, p >> 3
    return 2 * (16 * r + a + 2 * b) + (k & 1)


def pq_value_map(n: Tensor) -> Tensor:
    """Value channel of value operand column ``n`` (0..127)."""
    return 16 * (n & 7) + (n >> 3)


def pq_maps(device) -> Tensor:
    """int32 ``(2, 128)``: key channel (``pq_key_map``), value channel (``pq_value_map``), made once per device."""
    return _mma.channel_maps(("pq",), device, lambda i: [pq_key_map(i), pq_value_map(i)])


# ----------------------------------------------------------------------------------------------- the gate
def pq_mma_supported(q: Tensor, cache) -> bool:
    """``decode_mma.gluon_ready``, a ``PQCache`` of head dim 128 in 64 subspaces of 8-bit codes (an fp16 pair an
    entry), room for a tile, 2 to 16 query heads a KV head."""
    if not _mma.gluon_ready(q) or cache.head_dim != 128 or cache.subspaces != 64 or cache.bits != 8:
        return False
    h = cache.k_codes.shape[1]
    return 1 < q.shape[1] // h <= 16 and cache.k_codes.shape[2] >= pq_tile() and cache.k_codes.shape[3] == 64


# ----------------------------------------------------------------------------------------------- PyTorch mirror
def pq_mma_reference(q: Tensor, cache, sm_scale: float | None = None) -> Tensor:
    """The program's algebra in PyTorch over the packed tokens only: the key operand rows in ``pq_key_map`` order
    (entries of the fp16 codebook), the fp16 query in that order, fp16 probabilities, value columns in
    ``pq_value_map`` order -> ``(B, H*G, 128)`` float32. Against ``vq_reference`` it checks the maps."""
    from .vq_reference import pq_decode_codes, unpack_vq_codes

    b, h = cache.k_codes.shape[:2]
    n = cache.n_packed
    g = q.shape[1] // h
    scale = 1.0 / 128 ** 0.5 if sm_scale is None else sm_scale
    kch, vch = pq_maps(q.device).long()
    k = pq_decode_codes(unpack_vq_codes(cache.k_codes[:, :, :n], 8, 64), cache.ck.half())[..., kch]
    v = pq_decode_codes(unpack_vq_codes(cache.v_codes[:, :, :n], 8, 64), cache.cv.half())[..., vch]
    qs = (cache.table_query(q).float() * scale).half().float().view(b, h, g, 128)[..., kch]
    p = torch.softmax(torch.einsum("bhgk,bhnk->bhgn", qs, k), -1)
    acc = torch.einsum("bhgn,bhnc->bhgc", p.half().float(), v)
    return _mma.value_channels(acc, vch)


# ----------------------------------------------------------------------------------------------- Gluon program
if gluon is not None:
    @gluon.constexpr_function
    def _fill_asm():
        return ("{.reg .b32 a; mov.b32 a, global_smem; mad.lo.u32 a, $4, 4, a; "
                "st.shared.v4.b32 [a], {$8, $9, $10, $11}; "
                "mov.b32 $0, 0; mov.b32 $1, 0; mov.b32 $2, 0; mov.b32 $3, 0;}")

    @gluon.constexpr_function
    def _key_asm(j):
        """Entries of the 4 code bytes of word ``j`` of a thread's key row quarter (subspaces ``16 r + 4 j + i``;
        ``$9`` = ``16 r`` KiB) -> 8 fp16 (entry ``i``: ``$2i``, ``$2i+1``). Entry ``(s, c)`` sits at byte
        ``1024 s + 4 c``: its bank is the code's, so a warp's 32 gathers spread over the banks."""
        body = "{.reg .b32 c, e, g; mov.b32 g, global_smem; add.u32 g, g, $9; "
        for i in range(4):
            body += (f"bfe.u32 c, $8, {8 * i}, 8; mad.lo.u32 c, c, 4, g; ld.shared.b32 e, [c+{(4 * j + i) * 1024}]; "
                     f"mov.b32 {{${2 * i}, ${2 * i + 1}}}, e; ")
        return body + "}"

    @gluon.constexpr_function
    def _value_asm(x):
        """Entries of code byte ``x`` of two tokens' words ``$4, $5`` (subspace ``4 word + x``, ``$6`` = ``4 word``
        KiB plus 64 KiB: the values' codebook follows the keys') -> the even channel of both tokens (``$0, $1``) and
        the odd (``$2, $3``)."""
        off = 1024 * x
        return ("{.reg .b32 c, d, ea, eb, g; mov.b32 g, global_smem; add.u32 g, g, $6; "
                f"bfe.u32 c, $4, {8 * x}, 8; mad.lo.u32 c, c, 4, g; ld.shared.b32 ea, [c+{off}]; "
                f"bfe.u32 d, $5, {8 * x}, 8; mad.lo.u32 d, d, 4, g; ld.shared.b32 eb, [d+{off}]; "
                "prmt.b32 c, ea, eb, 0x5410; prmt.b32 d, ea, eb, 0x7632; mov.b32 {$0, $1}, c; mov.b32 {$2, $3}, d;}")

    @gluon.jit
    def _fill(CK, CV, W: gl.constexpr):
        """Both codebooks (16384 int32 entries each) into shared memory at 0 and 64 KiB, between two
        barriers: every load issued before the first store."""
        fl: gl.constexpr = gl.BlockedLayout([4], [32], [W], [0])
        r = gl.arange(0, 16384, layout=fl)
        k = gl.load(CK + r)
        v = gl.load(CV + r)
        _barrier()  # no warp still reads a shared buffer of the code before
        gl.inline_asm_elementwise(_fill_asm(), "=r,=r,=r,=r,r,r,r,r,r,r,r,r", [r, k], dtype=gl.int32, is_pure=False,
                                  pack=4)
        gl.inline_asm_elementwise(_fill_asm(), "=r,=r,=r,=r,r,r,r,r,r,r,r,r", [16384 + r, v], dtype=gl.int32,
                                  is_pure=False, pack=4)
        _barrier()

    @gluon.jit
    def _quarter_words(x, W: gl.constexpr, BN: gl.constexpr):
        """Key words ``(W, 16, BN)`` (word ``4 r + j``) -> words ``j = 0..3``, each ``(W, 4, BN)``."""
        return _split4(gl.permute(gl.reshape(x, [W, 4, 2, 2, BN]), (0, 1, 4, 2, 3)))  # [W, r, n, j1, j0]

    @gluon.jit
    def _kentries(w, base, J: gl.constexpr):
        """Word ``J`` of each thread's quarter -> ``(..., hi, i0, i1)`` fp16: entry ``i`` of its 4 code bytes."""
        e = gl.inline_asm_elementwise(_key_asm(J), "=h,=h,=h,=h,=h,=h,=h,=h,r,r", [w, base],
                                      dtype=(gl.float16,) * 8, is_pure=False, pack=1)
        return gl.join(gl.join(gl.join(e[0], e[1]), gl.join(e[2], e[3])),
                       gl.join(gl.join(e[4], e[5]), gl.join(e[6], e[7])))

    @gluon.jit
    def _pq_keys(kw, kbase, W: gl.constexpr, BN: gl.constexpr, kb: gl.constexpr):
        """Key words ``(W, 16, BN)`` -> the B operand ``(W, 128, BN)``, rows in ``pq_key_map`` order."""
        w0, w1, w2, w3 = _quarter_words(kw, W, BN)
        b0, _, _, _ = _quarter_words(kbase, W, BN)
        x = gl.join(gl.join(_kentries(w0, b0, 0), _kentries(w1, b0, 1)),
                    gl.join(_kentries(w2, b0, 2), _kentries(w3, b0, 3)))  # [W, r, n, hi, i0, i1, j0, j1]
        x = gl.permute(x, (0, 7, 6, 5, 4, 1, 3, 2))  # [W, j1, j0, i1, i0, r, hi, n]
        return gl.convert_layout(gl.reshape(x, [W, 128, BN]), kb)

    @gluon.jit
    def _ventries(a, b, base, X: gl.constexpr):
        """Code byte ``X`` of token pairs' words -> ``(..., pair, e)`` fp16 (``e``: even / odd channel)."""
        e = gl.inline_asm_elementwise(_value_asm(X), "=h,=h,=h,=h,r,r,r", [a, b, base],
                                      dtype=(gl.float16,) * 4, is_pure=False, pack=1)
        return gl.join(gl.join(e[0], e[1]), gl.join(e[2], e[3]))

    @gluon.jit
    def _pq_values(vw, vbase, W: gl.constexpr, BN: gl.constexpr, kb: gl.constexpr):
        """Value words ``(W, BN, 16)`` -> the B operand ``(W, BN, 128)``, columns in ``pq_value_map`` order."""
        a, b = _token_pairs(vw, W, BN, 16)
        ba, _ = _token_pairs(vbase, W, BN, 16)
        y = gl.join(gl.join(_ventries(a, b, ba, 0), _ventries(a, b, ba, 1)),
                    gl.join(_ventries(a, b, ba, 2), _ventries(a, b, ba, 3)))  # [W, tp, word, pair, e, x0, x1]
        y = gl.reshape(y, [W, BN // 2, 8, 2, 2, 2, 2, 2])  # [W, tp, g, u, pair, e, x0, x1]
        y = gl.permute(y, (0, 1, 4, 3, 7, 6, 5, 2))  # [W, tp, pair, u, x1, x0, e, g]
        return gl.convert_layout(gl.reshape(y, [W, BN, 128]), kb)

    @gluon.jit
    def _split_out(MP, LP, AP, MAPS, b, h, H, NSP, sp, m_i, l_i, acc, zero, G: gl.constexpr, W: gl.constexpr,
                   m3: gl.constexpr, rows: gl.constexpr):
        """After the token loop of a program that read its own shared bytes: a barrier (every warp is done with the
        codebooks before Triton's own shared buffers), the 128 KiB allocation that makes the launch request them
        (kept by ``zero`` = 0.0), then the split's ``m, l`` and ``acc`` in the value channels of ``MAPS[1]``."""
        _barrier()
        keep_l: gl.constexpr = gl.BlockedLayout([1], [32], [W], [0])
        keep = gl.allocate_shared_memory(gl.int32, [32768], gl.SwizzledSharedLayout(1, 1, 1, [0]))
        keep.slice(0, 32 * W).store(gl.arange(0, 32 * W, layout=keep_l))
        kept = gl.sum(keep.slice(0, 32 * W).load(keep_l), 0).to(gl.float32) * zero
        sc = _store_ml(MP, LP, b, h, H, NSP, sp, m_i, l_i, G, rows)
        nn = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(0, m3)))
        och = gl.load(MAPS + 128 + nn)
        o = gl.sum(acc * sc[:, :, None], 0) + kept
        oh = gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(0, m3)))
        prow = (b.to(gl.int64) * H * G + h * G + oh) * NSP + sp
        gl.store(AP + prow[:, None] * 128 + och[None, :], o, mask=(oh < G)[:, None])

    @gluon.jit
    def pq_mma_kernel(Q, sqb, sqh, KC, VC, CK, CV, ck_sh, MAPS, MP, LP, AP, H, Tmax, n_packed, tokens_per_split,
                      NSP, qk_scale, zero, LENS, G: gl.constexpr, W: gl.constexpr, DYN: gl.constexpr = False):
        """Program ``(b * H + h, sp)``: query heads ``h G ..`` of batch ``b`` (``Q`` the query in the packed keys'
        channel order, ``PQCache.table_query``) over split ``sp`` of the packed tokens (``NSP - 1`` packed splits),
        ``KC, VC`` the code rows as int32 words (16 a token), ``CK, CV`` the fp16 codebooks as int32 entries (KV head
        ``h``'s at ``h ck_sh``), ``MAPS`` the ``pq_maps``; ``zero`` is 0.0 (it keeps the 128 KiB allocation);
        ``DYN``: the packed count read from ``LENS`` and the split made here (``decode_mma._program``). Writes
        ``m, l`` and the unnormalized ``acc (128,)`` of each query head."""
        BN: gl.constexpr = 32
        pid, sp, b, h, start, end = _program(H, LENS, n_packed, tokens_per_split, NSP, W * BN, DYN)
        m3: gl.constexpr = _mma_layout(W)
        qa: gl.constexpr = gl.DotOperandLayout(0, m3, 2)
        kb: gl.constexpr = gl.DotOperandLayout(1, m3, 2)
        rows: gl.constexpr = gl.SliceLayout(2, m3)
        kwl: gl.constexpr = _words_layout(W, BN, True, 4)
        vwl: gl.constexpr = _words_layout(W, BN, False, 4)
        q16 = _query_rows(Q, sqb, sqh, b, h, MAPS, qk_scale, G, W, qa).to(gl.float16)
        koff = _tile_offsets(W, BN, 16, 2, kwl)
        voff = _tile_offsets(W, BN, 16, 1, vwl)
        # shared byte offsets of a thread's subspaces: keys 16 r KiB (words 4 r ..), values 4 word KiB past the keys
        kbase = (koff % 16 // 4) * 16384
        vbase = (voff % 16) * 4096 + 65536
        ct = _score_tokens(W, BN, m3)
        row = pid.to(gl.int64) * Tmax
        last = Tmax - W * BN  # tiles start at or before it (Tmax >= W BN), so every read is inside the buffers
        m_i = gl.full([W, 16], float("-inf"), gl.float32, rows)
        l_i = gl.zeros([W, 16], gl.float32, rows)
        acc = gl.zeros([W, 16, 128], gl.float32, m3)
        base = row + gl.minimum(start, last)
        kw = gl.load(KC + base * 16 + koff)
        vw = gl.load(VC + base * 16 + voff)
        _fill(CK + h * ck_sh, CV + h * ck_sh, W)
        for t0 in range(start, end, W * BN):
            nb = row + gl.minimum(t0 + W * BN, last)
            kn = gl.load(KC + nb * 16 + koff)
            vn = gl.load(VC + nb * 16 + voff)
            t0c = gl.minimum(t0, last)
            valid = _in_split(ct, t0, t0c, end)
            s = mma_v2(q16, _pq_keys(kw, kbase, W, BN, kb), gl.zeros([W, 16, BN], gl.float32, m3))
            s = gl.where(valid[:, None, :], s, float("-inf"))
            p, alpha, m_i, l_i = _online(s, m_i, l_i)
            acc = mma_v2(gl.convert_layout(p.to(gl.float16), qa), _pq_values(vw, vbase, W, BN, kb),
                         acc * alpha[:, :, None])
            kw = kn
            vw = vn
        _split_out(MP, LP, AP, MAPS, b, h, H, NSP, sp, m_i, l_i, acc, zero, G, W, m3, rows)


def pq_compiled_counts(g: int = 4, warps: int = PQ_WARPS, sass: bool = False, dyn: bool = False) -> dict:
    """As ``decode_mma.compiled_counts``, for this program (``dyn``: counts on the device)."""
    from .decode_mma import _compile_counts

    sig = dict(Q="*fp16", KC="*i32", VC="*i32", CK="*i32", CV="*i32", MAPS="*i32", MP="*fp32", LP="*fp32",
               AP="*fp32", qk_scale="fp32", zero="fp32", LENS="*i64")
    aligned = ("Q", "sqb", "sqh", "KC", "VC", "CK", "CV", "ck_sh", "MAPS", "MP", "LP", "AP", "Tmax",
               "tokens_per_split")
    return _compile_counts(pq_mma_kernel, sig, dict(G=g, W=warps, DYN=dyn), aligned, warps, sass)


def _codebooks(cache) -> tuple[Tensor, Tensor, int]:
    """The codebooks as fp16 pairs viewed as int32 entries, and the entries a KV head (0: shared), converted once
    per codebook (``decode_attention._cached``)."""
    from .decode_attention import _cached

    def make():
        return tuple(c.to(torch.float16).contiguous().view(torch.int32) for c in (cache.ck, cache.cv))

    ck, cv = _cached(("pq-codebooks", id(cache.ck), id(cache.cv)), (cache.ck, cache.cv), make)
    return ck, cv, (16384 if cache.ck.dim() == 4 else 0)


def _pq_args(q: Tensor, cache, mp, lp, ap, per: int, nsp: int, scale: float, lens: Tensor | None = None) -> tuple:
    ck, cv, sh = _codebooks(cache)
    qt = cache.table_query(q).contiguous()
    return (qt, qt.stride(0), qt.stride(1), cache.k_codes.view(torch.int32), cache.v_codes.view(torch.int32), ck, cv,
            sh, pq_maps(q.device), mp, lp, ap, cache.k_codes.shape[1], cache.k_codes.shape[2], cache.n_packed, per,
            nsp, scale, 0.0, qt if lens is None else lens)


def shared_split(kernel, args, g: int, warps: int, store: dict, device, **consts) -> int:
    """Programs an SM of a shared-memory Gluon program (this one, ``decode_mma_cq``'s) at ``warps`` warps and ``g``
    query heads (``consts``: its other compile-time arguments): what its registers and shared memory let an SM hold,
    compiled once (``args()``: a launch's arguments) and kept in ``store``."""
    key = (g, warps, device, *sorted(consts.items()))
    if key not in store:
        done = kernel.warmup(*args(), grid=(1, 1), G=g, W=warps, num_warps=warps, **consts)
        done._init_handles()
        store[key] = min(_mma.resident(done.n_regs, warps), max(1, SMEM_PER_SM // (done.metadata.shared + 1024)))
    return store[key]


def launch_shared(name: str, kernel, args: tuple, g: int, warps: int, rows: int, nsp: int, **consts) -> None:
    """Splits ``0 .. nsp - 2`` of a plan by a shared-memory Gluon program (``rows``: B * H programs a split;
    ``consts``: its other compile-time arguments)."""
    if nsp >= 2:
        _mma.remember(name, kernel[(rows, nsp - 1)](*args, G=g, W=warps, num_warps=warps, **consts))


def pq_split(q: Tensor, cache, lens: Tensor | None = None) -> tuple[int, int]:
    """(tokens a tile, programs an SM): what the compiled program's registers and shared memory let an SM hold."""
    f32 = torch.float32
    return pq_tile(), shared_split(pq_mma_kernel, lambda: _pq_args(q, cache, f32, f32, f32, pq_tile(), 2, 1.0, lens),
                                   q.shape[1] // cache.k_codes.shape[1], PQ_WARPS, _SPLIT, q.device,
                                   DYN=lens is not None)


def launch_pq_mma(q: Tensor, cache, mp: Tensor, lp: Tensor, ap: Tensor, per: int, nsp: int, scale: float,
                  lens: Tensor | None = None) -> None:
    """Splits ``0 .. nsp - 2`` of ``pq_decode``'s plan (``per`` a multiple of ``pq_tile()``) into the partial
    buffers; the last split (the fp16 segments) is ``pq_decode``'s. ``lens``: the counts on the device."""
    b, h = cache.k_codes.shape[:2]
    launch_shared("pq", pq_mma_kernel, _pq_args(q, cache, mp, lp, ap, per, nsp, scale, lens), q.shape[1] // h,
                  PQ_WARPS, b * h, nsp, DYN=lens is not None)


__all__ = ["PQ_WARPS", "pq_tile", "pq_mma_supported", "pq_split", "launch_pq_mma", "pq_mma_reference", "pq_key_map",
           "pq_value_map", "pq_maps", "pq_compiled_counts", "shared_split", "launch_shared"]
