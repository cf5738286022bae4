"""GQA decode attention over 2- and 4-bit ``int`` codes with both tensor-core operands made in registers (Gluon,
sm_80+).

The ``tl.dot`` programs of ``decode_token`` dequantize a tile, and Triton stages it through shared memory to make
it an MMA operand: on the H200 those programs are bound by that staging (``kernels-decode-attention.md``, session
10). This program is written in Gluon, Triton's explicit-layout dialect, so that every thread loads the very codes
that its ``mma.sync`` fragments hold and turns them into fp16 operands with bit tricks. The cache is read as it is
stored (``TokenCache``: channels in order, codes LSB first; one fp16 scale ``s`` and zero ``z`` a token-head); only
the order in which the program consumes channels is its own (``operand_maps``, one small table it reads).

* **Keys** (B operand, ``k`` = channel, ``n`` = token). A 32-bit word holds codes of ``32 / b`` channels, half in
  each 16-bit half. ``w & (mask << b i) | 0x64006400`` read as two fp16 is ``1024 + 2^e c`` for code ``i`` of both
  halves (after ``w >> 10``, 2 bits, or ``w >> 8``, 4 bits, for the codes above bit 9): a B register as it stands.
  The query is read in the same channel order and divided by ``2^e`` (exact), so the MMA gives
  ``1024 sum(q') + q . c`` and ``q . k = s (mma - 1024 sum(q')) + z sum(q)``.
* **Values** (B operand, ``k`` = token, ``n`` = channel). ``prmt`` puts byte ``x`` of two tokens' words side by
  side; the same mask-and-or gives ``1024 + 2^e c`` of a channel for both tokens. The probabilities are weighted by
  the value scale before the MMA (``p' = p s``); ``u = sum(p')`` and ``zs = sum(p z)`` are kept per query row, and
  ``out = (mma - 1024 u) / 2^e + zs``.

One program: a (batch, KV head) row's ``G <= 16`` query heads (the MMA rows) over one split of the packed tokens,
in tiles of ``W`` warps by ``BN`` tokens; warp ``w`` takes the w-th ``BN`` tokens of a tile (warps on the batch
axis of a 3-d ``mma_v2``, so the softmax needs no cross-warp traffic until the split's end), and the next tile's
loads are issued before this tile's math. It writes the split's ``m, l`` and unnormalized ``acc`` as the other split
programs do; ``decode_token``'s program does the fp16 sink and residual split (``SEG_ONLY``) and ``_finish`` merges.

There is no CPU interpreter for Gluon: the CPU tests compile this for sm_90 (its token loop has no shared-memory
instruction) and check the maps and corrections with ``mma_reference``, the program's algebra in PyTorch; the GPU
tests run it.

Public: ``mma_supported(q, cache)``, ``mma_tile()``, ``mma_split(q, cache, lens)``, ``program_split``,
``resident``, ``launch_mma(q, cache, mp, lp, ap, per, nsp, scale, lens)``, ``mma_reference(q, cache, sm_scale)``,
``operand_maps(bits, device, values)``, ``operand_codes``, ``key_map``, ``value_map``,
``compiled_counts(...)``.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
except ImportError:  # a Triton without Gluon (< 3.5): the tl.dot programs run instead
    gluon = None

#: warps a program and tokens a warp (a tile is W * BN tokens): H200, 128K, Llama-3-8B heads (``bench/bench_mma.py``,
#: ``docs/results/kernels-decode-attention.md``, sessions 11-12). ``PROGRAMS_PER_SM``: programs an SM in the split
#: plan; None: as many as the compiled program's registers let an SM hold at once (``resident``), the best setting
#: of every sweep so far. ``MAXNREG``: a register cap (``maxnreg``; None: the compiler's choice).
WARPS, BLOCK = 2, 32
#: G <= 8: the value product transposed (``acc^T (128, 8)``; ``int_mma_kernel``'s ``SWAP``). Off: on the H200 it
#: was 1.3-1.4x slower than the plain product (int2 128K 91 against 71 µs, int4 97 against 74), though it compiles to
#: 13% fewer instructions a tile and int4 to 186 registers against 236 (session 12, `bench/bench_swap_pv.py`)
SWAP_PV = False
PROGRAMS_PER_SM: int | None = None
MAXNREG: int | None = None
#: what the last launch of each program compiled to: ``{"int" | "kivi" | "kvquant" | "nf": (registers a thread,
#: spilled bytes)}``
COMPILED: dict = {}
_RESIDENT: dict = {}


def mma_tile() -> int:
    """Tokens a tile (the split plan's block): ``WARPS * BLOCK``."""
    return WARPS * BLOCK


def launch_options() -> dict:
    """The compile options the Gluon programs launch with (``num_warps``, and ``maxnreg`` when ``MAXNREG`` is set)."""
    return dict(num_warps=WARPS) if MAXNREG is None else dict(num_warps=WARPS, maxnreg=MAXNREG)


def remember(name: str, kernel) -> None:
    """Record a launched program's registers a thread and spilled bytes in ``COMPILED[name]``."""
    COMPILED[name] = (getattr(kernel, "n_regs", None), getattr(kernel, "n_spills", None))


def resident(regs: int, warps: int) -> int:
    """Programs of ``warps`` warps at ``regs`` registers a thread that one SM holds at once (sm_80 and sm_90: 64K
    registers, allocated 256 at a time a warp; 64 warps; 32 programs)."""
    per_warp = -(-regs * 32 // 256) * 256
    return max(1, min(65536 // (per_warp * warps), 64 // warps, 32))


def program_split(kernel, consts: dict, device, launch_args, block: int | None = None) -> tuple[int, int]:
    """(tokens a tile, programs an SM) of Gluon program ``kernel`` for ``decode_attention._launch_plan``'s split plan.
    ``consts``: a launch's constants; ``launch_args()``: its arguments (buffers may be dtypes), made only the first
    time; ``block``: tokens a warp (``BLOCK`` when None). With ``PROGRAMS_PER_SM`` None the program is compiled once
    (no launch) for these constants on ``device``, and the count is what its registers allow (``resident``), kept a
    process."""
    tile = WARPS * (BLOCK if block is None else block)
    if PROGRAMS_PER_SM is not None:
        return tile, PROGRAMS_PER_SM
    key = (kernel.__name__, tuple(sorted(consts.items())), MAXNREG, device)
    if key not in _RESIDENT:
        done = kernel.warmup(*launch_args(), grid=(1, 1), **consts, **launch_options())
        done._init_handles()
        _RESIDENT[key] = resident(done.n_regs, consts["W"])
    return tile, _RESIDENT[key]


# ----------------------------------------------------------------------------------------------- index maps
# The program consumes channels in its own order; these maps (one table, ``operand_maps``) say which. A key operand
# row ``k`` is field ``i`` of half ``hi`` of word ``w`` of a token's row: channel ``(32 w + 16 hi + b i) / b`` for
# ``b`` bits, value ``1024 + 2^e c`` (``e`` its shift). A value operand column ``n`` is field ``j`` of byte ``x`` of
# word ``u``: channel ``(32 u + 8 x + b j) / b``, value ``1024 + 2^e c``.
def key_map(k: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """-> (channel, shift ``e``) of key operand rows ``k`` (0..127)."""
    if bits == 2:  # k = hi + 2 w1 + 4 w2 + 8 w0 + 16 i; fields 5..7 after w >> 10
        w = 4 * ((k >> 2) & 1) + 2 * ((k >> 1) & 1) + ((k >> 3) & 1)
        hi, i = k & 1, k >> 4
        return 16 * w + 8 * hi + i, 2 * i - 10 * ((i + 3) >> 3)
    # 4 bits: k = hi + 2 w2 + 4 w3 + 8 w0 + 16 w1 + 32 i; fields 2, 3 after w >> 8
    w = 8 * ((k >> 2) & 1) + 4 * ((k >> 1) & 1) + 2 * ((k >> 4) & 1) + ((k >> 3) & 1)
    hi, i = k & 1, k >> 5
    return 8 * w + 4 * hi + i, 4 * (i & 1)


def value_map(n: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """-> (channel, shift ``e``) of value operand columns ``n`` (0..127); lane ``n & 7`` holds 16 channels."""
    g = n & 7
    if bits == 2:  # n = g + 8 j + 32 x: word g, byte x, field j
        j, x = (n >> 3) & 3, (n >> 5) & 3
        return 16 * g + 4 * x + j, 2 * j
    j, x, u = (n >> 3) & 1, (n >> 4) & 3, (n >> 6) & 1  # n = g + 8 j + 16 x + 64 u: word 2 g + u
    return 16 * g + 8 * u + 2 * x + j, 4 * j


_MAPS: dict = {}


def channel_maps(key: tuple, device, rows) -> Tensor:
    """int32 ``(R, 128)`` on ``device``: the ``R`` rows ``rows(n)`` of operand columns ``n = 0..127`` (channels,
    shifts), made once per ``key`` and device (every Gluon program's ``MAPS``)."""
    k = (*key, str(device))
    if k not in _MAPS:
        _MAPS[k] = torch.stack(list(rows(torch.arange(128)))).to(device, torch.int32).contiguous()
    return _MAPS[k]


def operand_maps(bits: int, device, values=None) -> Tensor:
    """int32 ``(4, 128)``: key channel, key shift, value channel, value shift (``key_map``; ``values(n)`` ->
    (channel, shift), ``value_map`` when None), made once per device."""
    return channel_maps(("operand", bits, values), device,
                        lambda i: [*key_map(i, bits), *(value_map(i, bits) if values is None else values(i))])


def operand_codes(words: Tensor, channels: Tensor, bits: int) -> Tensor:
    """The codes of ``channels`` from int64 ``words (..., D b / 32)`` of rows packed LSB first -> ``(..., len)``."""
    per_word = 32 // bits
    return (words[..., channels // per_word] >> (bits * (channels % per_word))) & ((1 << bits) - 1)


# ----------------------------------------------------------------------------------------------- the gate
def gluon_ready(q: Tensor) -> bool:
    """Whether a Gluon program can run on ``q``'s device: Gluon present, a CUDA GPU of compute capability 8.0+, not
    under the Triton interpreter."""
    return (gluon is not None and q.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1"
            and torch.cuda.get_device_capability(q.device)[0] >= 8)


def query_groups(q: Tensor, cache) -> int:
    """Query heads a KV head of ``cache``."""
    return q.shape[1] // cache.k_packed.shape[1]


def mma_supported(q: Tensor, cache) -> bool:
    """Whether this program runs ``q`` against ``cache``: ``gluon_ready``, a 2- or 4-bit ``int`` cache (zero points,
    no level table) of head dim 128 and room for a tile, 2 to 16 query heads a KV head."""
    return (gluon_ready(q) and cache.bits in (2, 4) and cache.head_dim == 128 and cache.k_zero is not None
            and cache.levels is None and 1 < query_groups(q, cache) <= 16 and cache.k_packed.shape[2] >= mma_tile())


# ----------------------------------------------------------------------------------------------- PyTorch mirror
def value_channels(acc: Tensor, vch: Tensor) -> Tensor:
    """The PyTorch mirrors' last step: ``acc (B, H, G, 128)`` in value-operand column order (column ``n`` is channel
    ``vch[n]``) -> ``(B, H*G, 128)`` in channel order, as the programs store it."""
    out = torch.empty_like(acc)
    out[..., vch] = acc
    return out.reshape(acc.shape[0], -1, acc.shape[-1])


def mma_reference(q: Tensor, cache, sm_scale: float | None = None) -> Tensor:
    """The program's algebra in PyTorch over the packed tokens only (no fp16 segments): the operands its bit tricks
    make (``1024 + 2^e c``) from the stored words, in the order of ``operand_maps``, and the same corrections ->
    ``(B, H*G, 128)`` float32. Against ``token_reference`` it checks the maps and the corrections the program uses
    (the tests check the bit tricks' values themselves)."""
    b, h = cache.k_packed.shape[:2]
    n, bits = cache.n_packed, cache.bits
    g = q.shape[1] // h
    scale = (1.0 / 128 ** 0.5 if sm_scale is None else sm_scale)
    kw, vw = [x[:, :, :n].contiguous().view(torch.int32).to(torch.int64) for x in (cache.k_packed, cache.v_packed)]
    kch, ke, vch, ve = operand_maps(bits, q.device).long()
    kop = 1024.0 + operand_codes(kw, kch, bits).float() * (1 << ke).float()  # (B, H, n, 128) in operand order
    qs = (q.float() * scale).view(b, h, g, 128)
    qp = (qs[..., kch] / (1 << ke).float()).half().float()  # the operand query
    mma = torch.einsum("bhgk,bhnk->bhgn", qp, kop)
    a_row = 1024 * qp.sum(-1, keepdim=True)
    b_row = qs.half().float().sum(-1, keepdim=True)
    ks, kz = cache.k_scale[:, :, :n].float(), cache.k_zero[:, :, :n].float()
    p = torch.softmax(ks[:, :, None, :] * (mma - a_row) + kz[:, :, None, :] * b_row, -1)
    vop = 1024.0 + operand_codes(vw, vch, bits).float() * (1 << ve).float()  # (B, H, n, 128) in operand order
    vs, vz = cache.v_scale[:, :, :n].float(), cache.v_zero[:, :, :n].float()
    pf = (p * vs[:, :, None, :]).half().float()
    acc = torch.einsum("bhgn,bhnc->bhgc", pf, vop)
    out_n = (acc - 1024 * pf.sum(-1, keepdim=True)) / (1 << ve).float() + (p * vz[:, :, None, :]).sum(-1, keepdim=True)
    return value_channels(out_n, vch)


# ----------------------------------------------------------------------------------------------- Gluon program
if gluon is not None:
    @gluon.constexpr_function
    def _warp_bases(w):
        return [[1 << i, 0, 0] for i in range(w.bit_length() - 1)]

    @gluon.constexpr_function
    def _mma_layout(w):
        """The Gluon programs' accumulator layout ``(W, 16, N)`` for ``w`` warps, warp ``i`` on slice ``i`` of axis 0
        (``mma.sync`` m16n8k16); their operands are its ``DotOperandLayout`` s, per-row values its
        ``SliceLayout(2)``."""
        return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[w, 1, 1], instr_shape=[1, 16, 8])

    @gluon.constexpr_function
    def _words_layout(w, bn, keys, bits):
        """Who loads which words. Keys ``(W, NW words, BN tokens)``: a thread the 2 (2 bits) or 4 (4 bits) adjacent
        words of its 32 channels, of 1 token in 8 (and + 8, + 16). Values ``(W, BN, NW)``: a thread word ``g``
        (2 bits) or words ``2 g, 2 g + 1`` (4 bits) of 2 adjacent tokens (and + 8, + 16)."""
        def at(axis, v):
            return [v if a == axis else 0 for a in range(3)]

        nw = 4 * bits
        extra = bn.bit_length() - 4  # token bits past the 3 lane bits (keys) / the pair and 2 lane bits (values)
        own = bits // 2  # log2 of the adjacent words a thread holds (keys: 1 or 2; values: 0 or 1)
        if keys:
            regs = [at(1, 1 << e) for e in range(own)] + [at(2, 8 << e) for e in range(extra)]
            lanes = [at(1, 1 << own), at(1, 2 << own), at(2, 1), at(2, 2), at(2, 4)]
            return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=lanes, warp_bases=_warp_bases(w),
                                              block_bases=[], shape=[w, nw, bn])
        regs = [at(2, 1 << e) for e in range(own - 1)] + [at(1, 1)] + [at(1, 8 << e) for e in range(extra)]
        lanes = [at(1, 2), at(1, 4)] + [at(2, 1 << (own - 1 + e)) for e in range(3)]
        return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=lanes, warp_bases=_warp_bases(w),
                                          block_bases=[], shape=[w, bn, nw])

    @gluon.constexpr_function
    def _pair_asm(mask, shift):
        pre = "" if shift == 0 else f"shr.b32 t, $2, {shift}; "
        src = "$2" if shift == 0 else "t"
        return "{.reg .b32 t; " + pre + f"lop3.b32 t, {src}, {mask}, 0x64006400, 0xea; mov.b32 {{$0, $1}}, t;}}"

    @gluon.constexpr_function
    def _vpair_asm(x, j, bits):
        sel = x | (x << 4) | ((4 + x) << 8) | ((4 + x) << 12)
        mask = ((1 << bits) - 1) * 0x00010001 << (bits * j)
        return (f"{{.reg .b32 t; prmt.b32 t, $2, $3, {sel}; lop3.b32 t, t, {mask}, 0x64006400, 0xea; "
                "mov.b32 {$0, $1}, t;}")

    @gluon.jit
    def _kfield(w, I: gl.constexpr, BITS: gl.constexpr):
        """fp16 ``1024 + 2^e c`` of code ``I`` of both halves of words ``w``, joined (minor axis): in place for the
        codes in bits 0..9 of a half, after ``w >> 10`` (2 bits) or ``w >> 8`` (4 bits) for the rest."""
        FIT: gl.constexpr = 5 if BITS == 2 else 2  # codes of a half below bit 10
        SHIFT: gl.constexpr = 10 if BITS == 2 else 8
        MASK: gl.constexpr = ((1 << BITS) - 1) * 0x00010001
        if I < FIT:
            lo, hi = gl.inline_asm_elementwise(_pair_asm(MASK << (BITS * I), 0), "=h,=h,r", [w],
                                               dtype=(gl.float16, gl.float16), is_pure=True, pack=1)
        else:
            lo, hi = gl.inline_asm_elementwise(_pair_asm(MASK << (BITS * I - SHIFT), SHIFT), "=h,=h,r", [w],
                                               dtype=(gl.float16, gl.float16), is_pure=True, pack=1)
        return gl.join(lo, hi)

    @gluon.jit
    def _keys(kw, W: gl.constexpr, BN: gl.constexpr, BITS: gl.constexpr, kb: gl.constexpr):
        """K words ``(W, NW, BN)`` -> the B operand ``(W, 128, BN)`` (rows in ``key_map`` order)."""
        if BITS == 2:
            x = gl.join(gl.join(gl.join(_kfield(kw, 0, 2), _kfield(kw, 1, 2)),
                                gl.join(_kfield(kw, 2, 2), _kfield(kw, 3, 2))),
                        gl.join(gl.join(_kfield(kw, 4, 2), _kfield(kw, 5, 2)),
                                gl.join(_kfield(kw, 6, 2), _kfield(kw, 7, 2))))
            x = gl.reshape(x, [W, 2, 2, 2, BN, 2, 2, 2, 2])  # [W, w2, w1, w0, n, hi, i0, i1, i2]
            x = gl.permute(x, (0, 8, 7, 6, 3, 1, 2, 5, 4))  # [W, i2, i1, i0, w0, w2, w1, hi, n]
        else:
            x = gl.join(gl.join(_kfield(kw, 0, 4), _kfield(kw, 1, 4)), gl.join(_kfield(kw, 2, 4), _kfield(kw, 3, 4)))
            x = gl.reshape(x, [W, 2, 2, 2, 2, BN, 2, 2, 2])  # [W, w3, w2, w1, w0, n, hi, i0, i1]
            x = gl.permute(x, (0, 8, 7, 3, 4, 1, 2, 6, 5))  # [W, i1, i0, w1, w0, w3, w2, hi, n]
        return gl.convert_layout(gl.reshape(x, [W, 128, BN]), kb)

    @gluon.jit
    def _vpair(a, b, X: gl.constexpr, J: gl.constexpr, BITS: gl.constexpr):
        """Code ``J`` of byte ``X`` of words ``a`` and ``b`` -> fp16 ``1024 + 2^(BITS J) c`` of both, joined."""
        lo, hi = gl.inline_asm_elementwise(_vpair_asm(X, J, BITS), "=h,=h,r,r", [a, b],
                                           dtype=(gl.float16, gl.float16), is_pure=True, pack=1)
        return gl.join(lo, hi)

    @gluon.jit
    def _vbyte(a, b, X: gl.constexpr, BITS: gl.constexpr):
        """The codes of byte ``X`` of token pairs ``(a, b)``, on minor axes ``[pair, j...]``."""
        if BITS == 2:
            return gl.join(gl.join(_vpair(a, b, X, 0, 2), _vpair(a, b, X, 1, 2)),
                           gl.join(_vpair(a, b, X, 2, 2), _vpair(a, b, X, 3, 2)))
        else:
            return gl.join(_vpair(a, b, X, 0, 4), _vpair(a, b, X, 1, 4))

    @gluon.jit
    def _values(vw, W: gl.constexpr, BN: gl.constexpr, BITS: gl.constexpr, vb: gl.constexpr,
                T: gl.constexpr = False):
        """V words ``(W, BN, NW)`` -> the B operand ``(W, BN, 128)`` (columns in ``value_map`` order); ``T``: the A
        operand ``(W, 128, BN)`` of the transposed product (rows in ``value_map`` order; each thread holds the same
        codes either way)."""
        a, b = _token_pairs(vw, W, BN, 4 * BITS)
        y = _arrange_values(gl.join(gl.join(_vbyte(a, b, 0, BITS), _vbyte(a, b, 1, BITS)),
                                    gl.join(_vbyte(a, b, 2, BITS), _vbyte(a, b, 3, BITS))), W, BN, BITS)
        if T:
            y = gl.permute(y, (0, 2, 1))
        return gl.convert_layout(y, vb)

    @gluon.jit
    def _token_pairs(vw, W: gl.constexpr, BN: gl.constexpr, NW: gl.constexpr):
        """V words ``(W, BN, NW)`` -> the words of tokens ``2 tp`` and ``2 tp + 1``, each ``(W, BN / 2, NW)``."""
        return gl.split(gl.permute(gl.reshape(vw, [W, BN // 2, 2, NW]), (0, 1, 3, 2)))

    @gluon.jit
    def _arrange_values(y, W: gl.constexpr, BN: gl.constexpr, BITS: gl.constexpr):
        """The four bytes' operand pairs ``(W, BN / 2, NW, pair, j..., x...)`` -> ``(W, BN, 128)``, columns in
        ``value_map`` order."""
        if BITS == 2:
            y = gl.reshape(y, [W, BN // 2, 2, 2, 2, 2, 2, 2, 2, 2])  # [W, tp, g2, g1, g0, pair, j0, j1, x0, x1]
            y = gl.permute(y, (0, 1, 5, 9, 8, 7, 6, 2, 3, 4))  # [W, tp, pair, x1, x0, j1, j0, g2, g1, g0]
        else:
            y = gl.reshape(y, [W, BN // 2, 2, 2, 2, 2, 2, 2, 2, 2])  # [W, tp, g2, g1, g0, u, pair, j, x0, x1]
            y = gl.permute(y, (0, 1, 6, 5, 9, 8, 7, 2, 3, 4))  # [W, tp, pair, u, x1, x0, j, g2, g1, g0]
        return gl.reshape(y, [W, BN, 128])

    @gluon.jit
    def _rows8(x):
        """Rows ``0..7`` of ``x (W, 16, N)`` in an MMA accumulator layout (rows 8..15 are a register bit), transposed
        -> ``(W, N, 8)``."""
        a, _ = gl.split(gl.permute(gl.reshape(x, [x.shape[0], 2, 8, x.shape[2]]), (0, 2, 3, 1)))
        return gl.permute(a, (0, 2, 1))

    @gluon.jit
    def _first8(v, layout: gl.constexpr):
        """Entries ``0..7`` of per-row ``v (W, 16)`` -> ``(W, 8)`` in ``layout``."""
        a, _ = gl.split(gl.permute(gl.reshape(v, [v.shape[0], 2, 8]), (0, 2, 1)))
        return gl.convert_layout(a, layout)

    @gluon.jit
    def _program(H, LENS, n_packed, tokens_per_split, NSP, TILE: gl.constexpr, DYN: gl.constexpr):
        """Program ``(b * H + h, sp)`` -> ``pid, sp, b, h`` and its packed range ``[start, end)``: ``NSP - 1`` packed
        splits of whole tiles (``DYN``: the count read from ``LENS`` and the split made here, as
        ``decode_split._counts``)."""
        pid = gl.program_id(0)
        sp = gl.program_id(1)
        if DYN:
            npk = gl.load(LENS).to(gl.int32)
            per = gl.cdiv(gl.cdiv(npk, TILE), NSP - 1) * TILE
        else:
            npk = n_packed
            per = tokens_per_split
        start = sp * per
        return pid, sp, pid // H, pid % H, start, gl.minimum(start + per, npk)

    @gluon.jit
    def _query_rows(Q, sqb, sqh, b, h, MAPS, qk_scale, G: gl.constexpr, W: gl.constexpr, qa: gl.constexpr):
        """Query heads ``h G ..`` of batch ``b`` (rows past G zero), scaled, in the key-operand channel order of the
        maps' first row (``MAPS``) -> float32 ``(W, 16, 128)`` in the A layout (every warp all rows)."""
        qh = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, qa)))
        qk = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(1, qa)))
        qw = gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, qa)))
        qoff = qw[:, None, None] * 0 + (h * G + qh)[None, :, None] * sqh + gl.load(MAPS + qk)[None, None, :]
        qmask = (qw[:, None, None] * 0 + qh[None, :, None]) < G
        return gl.load(Q + b.to(gl.int64) * sqb + qoff, mask=qmask, other=0.0).to(gl.float32) * qk_scale

    @gluon.jit
    def _query(Q, sqb, sqh, b, h, MAPS, qk_scale, G: gl.constexpr, W: gl.constexpr, qa: gl.constexpr):
        """``_query_rows`` of ``operand_maps``, and the shifts ``2^e`` of those channels (the maps' second row)."""
        qs = _query_rows(Q, sqb, sqh, b, h, MAPS, qk_scale, G, W, qa)
        qk = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(1, qa)))
        return qs, (1 << gl.load(MAPS + 128 + qk)).to(gl.float32)

    @gluon.jit
    def _tile_offsets(W: gl.constexpr, BN: gl.constexpr, N: gl.constexpr, TOK_AXIS: gl.constexpr,
                      layout: gl.constexpr):
        """Element offsets in a tile of ``W BN`` token rows of ``N`` elements, ``layout`` over ``(W, N, BN)``
        (``TOK_AXIS`` 2) or ``(W, BN, N)`` (1); warp ``w`` takes tokens ``w BN ..``."""
        if TOK_AXIS == 2:
            return ((gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, layout)))[:, None, None] * BN +
                     gl.arange(0, BN, layout=gl.SliceLayout(0, gl.SliceLayout(1, layout)))[None, None, :]) * N +
                    gl.arange(0, N, layout=gl.SliceLayout(0, gl.SliceLayout(2, layout)))[None, :, None])
        else:
            return ((gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(2, layout)))[:, None, None] * BN +
                     gl.arange(0, BN, layout=gl.SliceLayout(0, gl.SliceLayout(2, layout)))[None, :, None]) * N +
                    gl.arange(0, N, layout=gl.SliceLayout(0, gl.SliceLayout(1, layout)))[None, None, :])

    @gluon.jit
    def _score_tokens(W: gl.constexpr, BN: gl.constexpr, m3: gl.constexpr):
        """Token offsets ``w BN + n`` of the score columns ``(W, BN)``, in ``SliceLayout(1, m3)``."""
        return (gl.arange(0, W, layout=gl.SliceLayout(1, gl.SliceLayout(1, m3)))[:, None] * BN +
                gl.arange(0, BN, layout=gl.SliceLayout(0, gl.SliceLayout(1, m3)))[None, :])

    @gluon.jit
    def _in_split(tok, t0, t0c, end):
        """Which of a tile's token offsets ``tok`` (from its row ``t0c``, any layout) fall in ``[t0, end)``: the tile
        that starts at ``t0`` may be moved back to ``t0c`` to stay inside the buffers."""
        return (tok - (t0 - t0c)).to(gl.uint32) < (end - t0).to(gl.uint32)

    @gluon.jit
    def _online(s, m_i, l_i):
        """Online softmax of a tile's scores (-inf where not valid) -> ``p``, the rescale ``alpha``, new ``m, l``."""
        m_new = gl.maximum(m_i, gl.max(s, 2))
        base = _safe(m_new)
        alpha = gl.exp2(m_i - base)
        p = gl.exp2(s - base[:, :, None])
        return p, alpha, m_new, l_i * alpha + gl.sum(p, 2)

    @gluon.jit
    def _store_ml(MP, LP, b, h, H, NSP, sp, m_i, l_i, G: gl.constexpr, rows: gl.constexpr):
        """The warps' running max and sum merged -> written for the split; returns the warps' rescales."""
        m_all = gl.max(m_i, 0)
        sc = gl.exp2(m_i - _safe(m_all)[None, :])
        l_all = gl.sum(l_i * sc, 0)
        rr = gl.arange(0, 16, layout=gl.SliceLayout(0, rows))
        prow_r = (b.to(gl.int64) * H * G + h * G + rr) * NSP + sp
        gl.store(MP + prow_r, m_all, mask=rr < G)
        gl.store(LP + prow_r, l_all, mask=rr < G)
        return sc

    @gluon.jit
    def _tile_loads(KW, VW, KS, KZ, VS, VZ, base, koff, voff, ct, NW: gl.constexpr):
        """One tile's K words, V words and per-token statistics (in the score layout), its first token at row
        ``base`` of the buffers: the offsets are the same for every tile, only the scalar base moves."""
        kw = gl.load(KW + base * NW + koff)
        vw = gl.load(VW + base * NW + voff)
        ks = gl.load(KS + base + ct)
        kz = gl.load(KZ + base + ct)
        vs = gl.load(VS + base + ct)
        vz = gl.load(VZ + base + ct)
        return kw, vw, ks, kz, vs, vz

    @gluon.jit
    def _safe(m):
        """Exponent base of a running max: 0 where no token was seen yet (-inf)."""
        return gl.where(m == float("-inf"), 0.0, m)

    @gluon.jit
    def _swap_out(AP, b, h, H, G: gl.constexpr, NSP, sp, MAPS, acc, u_i, z_i, sc, W: gl.constexpr, m3: gl.constexpr):
        """``SWAP``'s output: ``acc^T (W, 128, 8)`` and the rows' ``u, z, sc (W, 16)`` -> the split's ``acc`` of the
        ``G <= 8`` query heads."""
        col: gl.constexpr = gl.SliceLayout(1, m3)  # (W, 8): per query head, along acc^T's columns
        u8 = _first8(u_i, col)
        z8 = _first8(z_i, col)
        s8 = _first8(sc, col)
        nn = gl.arange(0, 128, layout=gl.SliceLayout(1, gl.SliceLayout(0, m3)))
        och = gl.load(MAPS + 256 + nn)
        vf = (1 << gl.load(MAPS + 384 + nn)).to(gl.float32)
        o = gl.sum((acc - 1024.0 * u8[:, None, :]) * s8[:, None, :], 0) / vf[:, None]
        o = o + gl.convert_layout(gl.sum(z8 * s8, 0), gl.SliceLayout(0, gl.SliceLayout(0, m3)))[None, :]
        oh = gl.arange(0, 8, layout=gl.SliceLayout(0, gl.SliceLayout(0, m3)))
        prow = (b.to(gl.int64) * H * G + h * G + oh) * NSP + sp
        gl.store(AP + prow[None, :] * 128 + och[:, None], o, mask=(oh < G)[None, :])

    @gluon.jit
    def int_mma_kernel(Q, sqb, sqh, KW, KS, KZ, VW, VS, VZ, MAPS, MP, LP, AP, H, Tmax, n_packed, tokens_per_split,
                       NSP, qk_scale, LENS, G: gl.constexpr, BITS: gl.constexpr, W: gl.constexpr, BN: gl.constexpr,
                       DYN: gl.constexpr, SWAP: gl.constexpr = False):
        """Program ``(b * H + h, sp)``: query heads ``h G ..`` of batch ``b`` over split ``sp`` of the packed tokens
        (``NSP - 1`` packed splits; ``DYN``: counts read from ``LENS`` and the split made here, as
        ``decode_split._counts``), ``BITS``-bit codes as int32 words, ``MAPS`` the ``operand_maps``. Writes ``m, l``
        and the unnormalized ``acc (128,)`` of each query head. ``SWAP`` (G <= 8): the value product transposed,
        ``acc^T (128, 8) += V^T (128, BN) p'^T (BN, 8)``, so the accumulator and the value MMAs are half those of
        ``(16, BN) x (BN, 128)`` with rows 8..15 empty; ``p'^T`` is rows 0..7 of ``p'`` in place, and only the
        rescale ``alpha`` moves across lanes a tile."""
        NW: gl.constexpr = 4 * BITS  # words a token row
        pid, sp, b, h, start, end = _program(H, LENS, n_packed, tokens_per_split, NSP, W * BN, DYN)
        m3: gl.constexpr = _mma_layout(W)
        qa: gl.constexpr = gl.DotOperandLayout(0, m3, 2)
        kb: gl.constexpr = gl.DotOperandLayout(1, m3, 2)
        rows: gl.constexpr = gl.SliceLayout(2, m3)
        kwl: gl.constexpr = _words_layout(W, BN, True, BITS)
        vwl: gl.constexpr = _words_layout(W, BN, False, BITS)
        qs, qf = _query(Q, sqb, sqh, b, h, MAPS, qk_scale, G, W, qa)
        qp = (qs / qf[None, None, :]).to(gl.float16)  # divided by the shifts: the key MMA's query operand
        a_row = gl.convert_layout(gl.sum(qp.to(gl.float32), 2) * 1024.0, rows)
        b_row = gl.convert_layout(gl.sum(qs.to(gl.float16).to(gl.float32), 2), rows)
        # tile offsets (tokens of warp w: w BN + n): K words, V words, statistics in the score layout
        koff = _tile_offsets(W, BN, NW, 2, kwl)
        voff = _tile_offsets(W, BN, NW, 1, vwl)
        ct = _score_tokens(W, BN, m3)
        row = pid.to(gl.int64) * Tmax
        last = Tmax - W * BN  # tiles start at or before it (Tmax >= W BN), so every read is inside the buffers
        m_i = gl.full([W, 16], float("-inf"), gl.float32, rows)
        l_i = gl.zeros([W, 16], gl.float32, rows)
        u_i = gl.zeros([W, 16], gl.float32, rows)
        z_i = gl.zeros([W, 16], gl.float32, rows)
        if SWAP:
            acc = gl.zeros([W, 128, 8], gl.float32, m3)
        else:
            acc = gl.zeros([W, 16, 128], gl.float32, m3)
        nxt = _tile_loads(KW, VW, KS, KZ, VS, VZ, row + gl.minimum(start, last), koff, voff, ct, NW)
        for t0 in range(start, end, W * BN):
            kw, vw, ks, kz, vs, vz = nxt
            nxt = _tile_loads(KW, VW, KS, KZ, VS, VZ, row + gl.minimum(t0 + W * BN, last), koff, voff, ct, NW)
            # the tokens read are t0c + ct: those in [t0, end) count (one unsigned compare: the form the register
            # allocator does best with, 168 registers against 220-255 for two signed compares, Triton 3.6)
            t0c = gl.minimum(t0, last)
            valid = _in_split(ct, t0, t0c, end)
            vs = gl.where(valid, vs.to(gl.float32), 0.0)
            vz = gl.where(valid, vz.to(gl.float32), 0.0)
            s = mma_v2(qp, _keys(kw, W, BN, BITS, kb), gl.zeros([W, 16, BN], gl.float32, m3))
            s = ks.to(gl.float32)[:, None, :] * (s - a_row[:, :, None]) + \
                kz.to(gl.float32)[:, None, :] * b_row[:, :, None]
            s = gl.where(valid[:, None, :], s, float("-inf"))
            p, alpha, m_i, l_i = _online(s, m_i, l_i)
            pf = (p * vs[:, None, :]).to(gl.float16)
            u_i = u_i * alpha + gl.sum(pf.to(gl.float32), 2)
            z_i = z_i * alpha + gl.sum(p * vz[:, None, :], 2)
            if SWAP:
                a8 = _first8(alpha, gl.SliceLayout(1, m3))
                acc = mma_v2(_values(vw, W, BN, BITS, qa, True), gl.convert_layout(_rows8(pf), kb),
                             acc * a8[:, None, :])
            else:
                acc = mma_v2(gl.convert_layout(pf, qa), _values(vw, W, BN, BITS, kb), acc * alpha[:, :, None])
        # the warps' states, once a split
        sc = _store_ml(MP, LP, b, h, H, NSP, sp, m_i, l_i, G, rows)
        if SWAP:
            _swap_out(AP, b, h, H, G, NSP, sp, MAPS, acc, u_i, z_i, sc, W, m3)
        else:
            nn = gl.arange(0, 128, layout=gl.SliceLayout(0, gl.SliceLayout(0, m3)))
            och = gl.load(MAPS + 256 + nn)
            vf = (1 << gl.load(MAPS + 384 + nn)).to(gl.float32)
            o = gl.sum((acc - 1024.0 * u_i[:, :, None]) * sc[:, :, None], 0) / vf[None, :]
            o = o + gl.convert_layout(gl.sum(z_i * sc, 0), gl.SliceLayout(1, gl.SliceLayout(0, m3)))[:, None]
            oh = gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(0, m3)))
            prow = (b.to(gl.int64) * H * G + h * G + oh) * NSP + sp
            gl.store(AP + prow[:, None] * 128 + och[None, :], o, mask=(oh < G)[:, None])


def compiled_counts(g: int = 4, dyn: bool = True, bits: int = 2, warps: int = WARPS, block: int = BLOCK,
                    swap: bool = False, sass: bool = False) -> dict:
    """Compile the program for sm_90 on any machine (no GPU needed) -> PTX instruction counts of the whole kernel and
    of its token loop (the longest backward branch), and shared bytes (``sass``: and ``_cubin_stats``)."""
    sig = dict(Q="*fp16", KW="*i32", KS="*fp16", KZ="*fp16", VW="*i32", VS="*fp16", VZ="*fp16", MAPS="*i32",
               MP="*fp32", LP="*fp32", AP="*fp32", qk_scale="fp32", LENS="*i64")
    aligned = ("Q", "sqb", "sqh", "KW", "KS", "KZ", "VW", "VS", "VZ", "MAPS", "MP", "LP", "AP", "Tmax",
               "tokens_per_split")
    return _compile_counts(int_mma_kernel, sig, dict(G=g, BITS=bits, W=warps, BN=block, DYN=dyn, SWAP=swap), aligned,
                           warps, sass)


def _compile_counts(fn, typed: dict, consts: dict, aligned: tuple, warps: int, sass: bool = False) -> dict:
    """Compile Gluon kernel ``fn`` for sm_90 (``typed``: the non-int32 arguments' types; ``aligned``: arguments a
    launch specializes as multiples of 16) -> PTX counts of the kernel and of its longest loop, shared bytes;
    ``sass``: also the registers a thread, spilled bytes and the SASS instructions of the longest loop, read from the
    cubin by the Triton wheel's ``cuobjdump`` (``bench/ptxas_registers.py``)."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget

    try:
        from triton.experimental.gluon import GluonASTSource
    except ImportError:  # Triton 3.6
        from triton.experimental.gluon._runtime import GluonASTSource
    names = list(fn.arg_names)
    sig = {n: "i32" for n in names}
    sig.update(typed)
    sig.update({k: "constexpr" for k in consts})
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    done = triton.compile(GluonASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    lines = done.asm["ptx"].splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"^(\$L__BB\w+):", ln))}
    loop = (0, 0)
    for i, ln in enumerate(lines):
        m = re.search(r"bra(?:\.uni)?\s+(\$L__BB\w+);", ln)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > loop[1] - loop[0]:
            loop = (labels[m.group(1)], i + 1)
    body = "\n".join(lines[loop[0]:loop[1]])
    pats = ("ld.shared", "st.shared", "bar.sync", "mma.sync", "ld.global", "cvt.rn.f16.u", "cvt.rn.f32.u")
    out = dict(loop={p: body.count(p) for p in pats}, kernel={p: done.asm["ptx"].count(p) for p in pats},
               shared_bytes=done.metadata.shared)
    if sass:
        out.update(_cubin_stats(done.asm["cubin"]))
    return out


def _cubin_stats(cubin: bytes) -> dict:
    """Registers a thread, spilled bytes and the SASS instructions of the longest loop of a sm_90 cubin, and that
    loop's instructions by opcode (``loop_opcodes``, predicates and modifiers dropped: ``HFMA2``, ``SHFL``, ...)."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        dump = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    ins = [(int(m.group(1), 16), m.group(2)) for ln in dump.splitlines()
           if (m := re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", ln))]
    at = {a: i for i, (a, _) in enumerate(ins)}
    first, last = 0, -1
    for i, (a, text) in enumerate(ins):
        m = re.search(r"BRA\s+0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) < a and i - at.get(int(m.group(1), 16), i) > last - first:
            first, last = at.get(int(m.group(1), 16), i), i
    ops: dict = {}
    for _, text in ins[first:last + 1]:
        op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]
        ops[op] = ops.get(op, 0) + 1
    regs = re.search(r"REG:(\d+)", usage)
    spill = re.search(r"STACK:(\d+)", usage)
    return dict(registers=int(regs.group(1)) if regs else None, stack_bytes=int(spill.group(1)) if spill else None,
                sass_loop=last - first + 1, loop_opcodes=dict(sorted(ops.items(), key=lambda kv: -kv[1])))


def _int_consts(q: Tensor, cache, lens: Tensor | None) -> dict:
    """The program's constants for a launch on ``q, cache``."""
    g = query_groups(q, cache)
    return dict(G=g, BITS=cache.bits, W=WARPS, BN=BLOCK, DYN=lens is not None, SWAP=SWAP_PV and g <= 8)


def _int_args(q: Tensor, cache, mp, lp, ap, per: int, nsp: int, scale: float, lens: Tensor | None) -> tuple:
    """The program's arguments for one launch."""
    return (q, q.stride(0), q.stride(1), cache.k_packed.view(torch.int32), cache.k_scale, cache.k_zero,
            cache.v_packed.view(torch.int32), cache.v_scale, cache.v_zero, operand_maps(cache.bits, q.device), mp, lp,
            ap, cache.k_packed.shape[1], cache.k_packed.shape[2], cache.n_packed, per, nsp, scale,
            q if lens is None else lens)


def mma_split(q: Tensor, cache, lens: Tensor | None) -> tuple[int, int]:
    """(tokens a tile, programs an SM) of this program on ``q, cache`` (``program_split``)."""
    f32 = torch.float32
    return program_split(int_mma_kernel, _int_consts(q, cache, lens), q.device,
                         lambda: _int_args(q, cache, f32, f32, f32, mma_tile(), 2, 1.0, lens))


def launch_mma(q: Tensor, cache, mp: Tensor, lp: Tensor, ap: Tensor, per: int, nsp: int, scale: float,
               lens: Tensor | None) -> None:
    """Splits ``0 .. nsp - 2`` of ``decode_token``'s plan (``per`` tokens each, a multiple of ``mma_tile()``;
    ``lens``: counts on the device) into the partial buffers ``mp, lp (B*Hq, nsp)``, ``ap (B*Hq, nsp, 128)``."""
    if nsp < 2:
        return
    remember("int", int_mma_kernel[(cache.k_packed.shape[0] * cache.k_packed.shape[1], nsp - 1)](
        *_int_args(q, cache, mp, lp, ap, per, nsp, scale, lens), **_int_consts(q, cache, lens), **launch_options()))
