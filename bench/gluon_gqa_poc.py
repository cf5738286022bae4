"""Proof of concept, not yet a kvq kernel: GQA decode attention over 2-bit codes in Gluon (Triton's explicit-layout
dialect), with both tensor-core B operands built in registers from the loaded codes, so that nothing is staged
through shared memory in the loop (the limit of the ``tl.dot`` programs, ``kernels-decode-attention.md``).

    python bench/gluon_gqa_poc.py --compile-only        # any machine: compile for sm_90, count shared-memory ops
    python bench/gluon_gqa_poc.py --out poc.json        # a GPU: check against torch, time against fp16 SDPA and
                                                        # kvq's kivi-2b kernel at the same heads and context

One program takes one KV head's G <= 16 query heads and a chunk of 64-token tiles (split-K over the context; torch
merges the chunks). Warp w of 4 takes the w-th 16-token sub-block of every tile, as a batched ``mma_v2`` (warps on
the batch axis), so the softmax needs no cross-warp traffic until the end of the chunk. The PoC's own storage:

* K codes ``uint8 (H, T, D/4)``: 4 codes a byte along channels (kvq's packing); V codes transposed,
  ``uint8 (H, D, T/4)``: 4 consecutive tokens a byte. The program reads score column ``n`` of a sub-block as token
  ``tok(n)`` (below) and the value rows in the order their bytes unpack, so that every thread of the B-operand
  layouts owns whole bytes;
* one fp16 scale and zero per token for K and for V (int-style; KIVI's per-channel key scales are a next step).

The layouts are hand-derived (``gl.to_linear_layout`` prints what a thread owns) and guarded by
``convert_layout(..., assert_trivial=True)``. Gluon has no CPU interpreter: ``--compile-only`` is the CPU check,
and the index math was checked by a plain-Triton mirror under ``TRITON_INTERPRET=1`` (max error 3e-5).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

try:
    from triton.experimental.gluon import GluonASTSource
except ImportError:  # Triton 3.6
    from triton.experimental.gluon._runtime import GluonASTSource

BN = 16  # tokens of a warp's sub-block; a tile is 4 warps x 16 = 64 tokens
TILE = 64


@gluon.jit
def _tok(n):
    """Score column ``n`` (0..15) of a sub-block -> its token (the order the V bytes unpack in)."""
    return 4 * (((n >> 1) & 1) + 2 * ((n >> 2) & 1)) + (n & 1) + 2 * ((n >> 3) & 1)


@gluon.jit
def poc_kernel(Q, KC, KS, KZ, VC, VS, VZ, MP, LP, OP, G, T, PER, NSP, qk_scale, D: gl.constexpr):
    """Program ``h * NSP + sp``: query heads ``h*G ..`` against tokens ``[sp*PER, (sp+1)*PER)`` of KV head ``h``;
    writes the chunk's max ``MP``, sum ``LP`` (16,) and normalized output ``OP`` (16, D), float32."""
    pid = gl.program_id(0)
    h = pid // NSP
    sp = pid % NSP
    m3: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[4, 1, 1], instr_shape=[1, 16, 8])
    qa: gl.constexpr = gl.DotOperandLayout(0, m3, 8)
    kb: gl.constexpr = gl.DotOperandLayout(1, m3, 8)
    pa: gl.constexpr = gl.DotOperandLayout(0, m3, 2)
    vb: gl.constexpr = gl.DotOperandLayout(1, m3, 2)
    kp: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[0, 1, 0], [0, 8, 0], [0, 16, 0], [0, 0, 8]],
        lane_bases=[[0, 2, 0], [0, 4, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]],
        warp_bases=[[1, 0, 0], [2, 0, 0]], block_bases=[], shape=[4, D // 4, 16])
    vp: gl.constexpr = gl.DistributedLinearLayout(
        reg_bases=[[0, 0, 8], [0, 0, 16], [0, 0, 32], [0, 0, 64]],
        lane_bases=[[0, 1, 0], [0, 2, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]],
        warp_bases=[[1, 0, 0], [2, 0, 0]], block_bases=[], shape=[4, 4, D])
    # the query rows (zero past G) straight into the A layout; every warp holds all of them
    qw = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, qa)))
    qh = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, qa)))
    qd = gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(1, qa)))
    qoff = qw[:, None, None] * 0 + qh[None, :, None] * D + qd[None, None, :]
    q = gl.load(Q + h * G * D + qoff, mask=qoff < G * D, other=0.0)
    kw = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, kp)))
    kj = gl.arange(0, D // 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, kp)))
    kn = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, kp)))
    ktok = kw[:, None, None] * 16 + _tok(kn)[None, None, :]
    sw = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(1, kb)))
    sn = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(1, kb)))
    stok = sw[:, None] * 16 + _tok(sn)[None, :]
    vw = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, vp)))
    vj = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, vp)))
    vd = gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(1, vp)))
    uw = gl.arange(0, 4, layout=gl.SliceLayout(1, gl.SliceLayout(2, vb)))
    uc = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, vb)))
    utok = uw[:, None] * 16 + _tok(uc)[None, :]
    kc = KC + h.to(gl.int64) * T * (D // 4)
    vc = VC + h.to(gl.int64) * D * (T // 4)
    st = h.to(gl.int64) * T
    m_i = gl.full([4, 16], float("-inf"), gl.float32, gl.SliceLayout(2, m3))
    l_i = gl.zeros([4, 16], gl.float32, gl.SliceLayout(2, m3))
    acc = gl.zeros([4, 16, D], gl.float32, m3)
    for t0 in range(sp * PER, sp * PER + PER, 64):
        p = gl.load(kc + (t0 + ktok) * (D // 4) + kj[None, :, None])
        x = gl.join(gl.join(p & 3, (p >> 4) & 3), gl.join((p >> 2) & 3, (p >> 6) & 3))  # [4, D/4, 16, a, b]
        x = gl.reshape(gl.permute(x, (0, 1, 3, 4, 2)), [4, D, 16])  # channel 4j + 2a + b
        x = gl.convert_layout(x, kb, assert_trivial=True)
        ks = gl.load(KS + st + t0 + stok)
        kz = gl.load(KZ + st + t0 + stok)
        k = (x.to(gl.float16) - kz[:, None, :]) * ks[:, None, :]
        s = mma_v2(q, k, gl.zeros([4, 16, 16], gl.float32, m3)) * qk_scale  # [warp, query head, token]
        m_new = gl.maximum(m_i, gl.max(s, 2))
        alpha = gl.exp2(m_i - m_new)
        pr = gl.exp2(s - m_new[:, :, None])
        l_i = l_i * alpha + gl.sum(pr, 2)
        m_i = m_new
        pf = gl.convert_layout(pr.to(gl.float16), pa, assert_trivial=True)
        vv = gl.load(vc + vd[None, None, :] * (T // 4) + t0 // 4 + vw[:, None, None] * 4 + vj[None, :, None])
        y = gl.join(gl.join(vv & 3, (vv >> 4) & 3), gl.join((vv >> 2) & 3, (vv >> 6) & 3))
        y = gl.reshape(y, [4, 2, 2, D, 2, 2])
        y = gl.reshape(gl.permute(y, (0, 4, 1, 2, 5, 3)), [4, 16, D])  # row c = 8 c3 + 4 c2 + 2 c1 + c0
        y = gl.convert_layout(y, vb, assert_trivial=True)
        vs = gl.load(VS + st + t0 + utok)
        vz = gl.load(VZ + st + t0 + utok)
        v = (y.to(gl.float16) - vz[:, :, None]) * vs[:, :, None]
        acc = mma_v2(pf, v, acc * alpha[:, :, None])
    m_all = gl.max(m_i, 0)  # the 4 warps' states, once per chunk
    sc = gl.exp2(m_i - m_all[None, :])
    l_all = gl.sum(l_i * sc, 0)
    l_out = gl.convert_layout(l_all, gl.SliceLayout(1, gl.SliceLayout(0, m3)))
    o = gl.sum(acc * sc[:, :, None], 0) / l_out[:, None]
    oh = gl.arange(0, 16, layout=gl.SliceLayout(1, gl.SliceLayout(0, m3)))
    od = gl.arange(0, D, layout=gl.SliceLayout(0, gl.SliceLayout(0, m3)))
    gl.store(OP + pid.to(gl.int64) * 16 * D + oh[:, None] * D + od[None, :], o)
    row = gl.arange(0, 16, layout=gl.SliceLayout(0, gl.SliceLayout(2, m3)))
    gl.store(MP + pid * 16 + row, m_all)
    gl.store(LP + pid * 16 + row, l_all)


def make_inputs(h: int, g: int, t: int, d: int, device) -> dict:
    """Random codes, statistics and a query; the packed K / V buffers of the PoC's storage."""
    gen = torch.Generator().manual_seed(0)
    kc = torch.randint(0, 4, (h, t, d), dtype=torch.uint8, generator=gen)
    vc = torch.randint(0, 4, (h, t, d), dtype=torch.uint8, generator=gen)
    kpack = kc[..., 0::4] | kc[..., 1::4] << 2 | kc[..., 2::4] << 4 | kc[..., 3::4] << 6  # (H, T, D/4)
    vt = vc.transpose(1, 2)  # (H, D, T)
    vpack = vt[..., 0::4] | vt[..., 1::4] << 2 | vt[..., 2::4] << 4 | vt[..., 3::4] << 6  # (H, D, T/4)
    stats = [(torch.rand(h, t, generator=gen) * 0.5 + 0.25).half() for _ in range(4)]
    q = torch.randn(h * g, d, generator=gen).half()
    out = dict(kc=kc, vc=vc, kpack=kpack.contiguous(), vpack=vpack.contiguous(), ks=stats[0], kz=stats[1],
               vs=stats[2], vz=stats[3], q=q)
    return {k: v.to(device) for k, v in out.items()}


def reference(x: dict, g: int) -> torch.Tensor:
    """float32 attention of every query head over its KV head's dequantized tokens."""
    k = (x["kc"].float() - x["kz"].float()[..., None]) * x["ks"].float()[..., None]
    v = (x["vc"].float() - x["vz"].float()[..., None]) * x["vs"].float()[..., None]
    h, _, d = k.shape
    q = x["q"].float().view(h, g, d)
    w = torch.softmax(q @ k.transpose(1, 2) / d ** 0.5, -1)
    return (w @ v).reshape(h * g, d)


def launch(x: dict, h: int, g: int, t: int, d: int, nsp: int):
    """The PoC kernel over ``nsp`` chunks per KV head -> its partials ``m, l (H*nsp, 16)``, ``o (H*nsp, 16, D)``."""
    mp = torch.empty(h * nsp, 16, device=x["q"].device)
    lp = torch.empty_like(mp)
    op = torch.empty(h * nsp, 16, d, device=x["q"].device)
    poc_kernel[(h * nsp,)](x["q"], x["kpack"], x["ks"], x["kz"], x["vpack"], x["vs"], x["vz"], mp, lp, op, g, t,
                           t // nsp, nsp, 1.4426950408889634 / d ** 0.5, D=d, num_warps=4)
    return mp, lp, op


def run(x: dict, h: int, g: int, t: int, d: int, nsp: int):
    """``launch``, then torch's merge of the chunks -> ``(H*G, D)`` float32."""
    mp, lp, op = launch(x, h, g, t, d, nsp)
    mp, lp, op = mp.view(h, nsp, 16), lp.view(h, nsp, 16), op.view(h, nsp, 16, d)
    w = torch.exp2(mp - mp.amax(1, keepdim=True)) * lp
    return ((w[..., None] * op).sum(1) / w.sum(1)[..., None])[:, :g].reshape(h * g, d)


def compile_only(d: int = 128) -> dict:
    """Compile for sm_90 on any machine; count the PTX's shared-memory and MMA instructions."""
    from triton.backends.compiler import GPUTarget

    sig = dict(Q="*fp16", KC="*u8", KS="*fp16", KZ="*fp16", VC="*u8", VS="*fp16", VZ="*fp16", MP="*fp32",
               LP="*fp32", OP="*fp32", G="i32", T="i32", PER="i32", NSP="i32", qk_scale="fp32", D="constexpr")
    attrs = {(i,): [["tt.divisibility", 16]] for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12)}
    done = triton.compile(GluonASTSource(fn=poc_kernel, signature=sig, constexprs=dict(D=d), attrs=attrs),
                          target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    ptx = done.asm["ptx"]
    lines = ptx.splitlines()
    labels = {m.group(1): i for i, ln in enumerate(lines) if (m := re.match(r"^(\$L__BB\w+):", ln))}
    loop = ""  # the longest backward branch's span: the token loop
    for i, ln in enumerate(lines):
        m = re.search(r"bra(?:\.uni)?\s+(\$L__BB\w+);", ln)
        if m and labels.get(m.group(1), i) < i and i - labels[m.group(1)] > loop.count("\n"):
            loop = "\n".join(lines[labels[m.group(1)]:i + 1])
    pats = ("ld.shared", "st.shared", "ldmatrix", "bar.sync", "mma.sync", "ld.global", "shfl")
    return dict(triton=triton.__version__, shared_bytes=done.metadata.shared,
                kernel_ptx_counts={p: ptx.count(p) for p in pats}, loop_ptx_counts={p: loop.count(p) for p in pats})


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--out", default="")
    ap.add_argument("--context", type=int, default=131072)
    args = ap.parse_args()
    if args.compile_only or not torch.cuda.is_available():
        res = compile_only()
        print(json.dumps(res, indent=1))
        return
    import torch.nn.functional as F

    sys.path.insert(0, os.path.dirname(__file__))
    from bench_decode_attention import METHODS, bench, random_kivi
    from kvq_kernels.decode_attention import decode_attention_kivi

    res = dict(device=torch.cuda.get_device_name(), triton=triton.__version__, rows=[])
    small = make_inputs(2, 4, 4096, 128, "cuda")
    err = (run(small, 2, 4, 4096, 128, 4) - reference(small, 4)).abs().max().item()
    res["max_abs_err_4k"] = err
    print(f"check: max abs error against torch at 4K tokens {err:.2e}", flush=True)
    h, g, d, t = 8, 4, 128, args.context
    x = make_inputs(h, g, t, d, "cuda")
    kb = torch.randn(1, h, t, d, device="cuda", dtype=torch.float16)
    vb = torch.randn_like(kb)
    q = x["q"].view(1, h * g, 1, d)
    sdpa = bench(functools.partial(F.scaled_dot_product_attention, q, kb, vb, enable_gqa=True))
    del kb, vb
    kivi = random_kivi(1, h, d, t, METHODS["kivi-2b"])
    kv = bench(functools.partial(decode_attention_kivi, x["q"].view(1, h * g, d), kivi))
    res.update(sdpa_us=sdpa * 1e3, kivi2_us=kv * 1e3)
    print(f"Llama-3-8B heads, {t} tokens: fp16 SDPA {sdpa * 1e3:.1f} us, kvq kivi-2b {kv * 1e3:.1f} us", flush=True)
    for nsp in (16, 32, 64, 128):
        if t % (nsp * TILE):
            continue
        ms = bench(functools.partial(launch, x, h, g, t, d, nsp))
        full = bench(functools.partial(run, x, h, g, t, d, nsp))
        res["rows"].append(dict(splits=nsp, kernel_us=ms * 1e3, x_sdpa=sdpa / ms, with_merge_us=full * 1e3))
        print(f"  PoC, {nsp} chunks per head: kernel {ms * 1e3:.1f} us ({sdpa / ms:.2f}x SDPA), with torch's merge "
              f"{full * 1e3:.1f} us", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
