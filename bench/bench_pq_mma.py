"""MILLION (pq-d2x8b) and CQ (cq-4c8b) GQA decode attention on a GPU (not a test): the tensor-core programs
(``decode_mma_pq``, ``decode_mma_cq``) against the CUDA-core programs (``pq_decode``, ``cq_decode``) and fp16 SDPA,
in one run.

    python bench/bench_pq_mma.py --out pq.json [--method pq|cq] [--contexts 32768,131072,1048576] [--batches 1,8]
                                 [--warps 4,8,16]

Llama-3-8B heads (8 KV heads, 4 query heads each, D = 128), random codes. pq: 64 subspaces of 2 channels, 8-bit
codes, shared fp16 codebooks (per-head ones: ``--per-head``), 128 fp16 residual tokens. cq: 32 groups of 4 channels,
8-bit codes, per-head fp16 codebooks, pre-RoPE keys, 1 fp16 sink token (as ``bench_cq_pq_decode.py``). Each time is
the decode function as the runtime calls it (the packed splits, the fp16-segment split, the merge), replayed from a
CUDA graph with L2 flushed before every call (``bench_mma.graph_ms``); ``F.scaled_dot_product_attention(enable_gqa=
True)`` over fp16 K/V of the same context the same way. ``--warps``: the tensor-core program at each warp count
(``PQ_WARPS`` / ``CQ_WARPS``; the first is the default's row). A program with a ``PREFETCH`` switch (cq's) is also
timed without it, in the same run. First the program against the PyTorch reference at 4K tokens.
Results: ``docs/results/kernels-decode-attention.md`` (sessions 15, 16).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import kvq_kernels.cq_decode as cqd  # noqa: E402
import kvq_kernels.decode_mma as mma  # noqa: E402
import kvq_kernels.decode_mma_cq as cmma  # noqa: E402
import kvq_kernels.decode_mma_pq as pmma  # noqa: E402
import kvq_kernels.pq_decode as pqd  # noqa: E402
from bench_decode_attention import copy_bandwidth  # noqa: E402
from bench_mma import _timed, graph_ms  # noqa: E402
from kvq_kernels.vq_reference import decode_attention_cq_ref, decode_attention_pq_ref, empty_vq_cache  # noqa: E402

H, G, D, RES = 8, 4, 128, 128


def random_pq(b: int, t: int, per_head: bool):
    """A pq-d2x8b cache of ``t`` tokens (``t - 128`` packed, 128 fp16 residual), fp16 codebooks."""
    shape = (H,) * per_head + (64, 256, 2)
    ck, cv = (torch.randn(*shape, device="cuda").half() for _ in range(2))
    c = empty_vq_cache("pq", b, H, t - RES, 8, ck, cv, max_res=RES)
    for x in (c.k_codes, c.v_codes):
        x.random_(0, 256)
    c.res_k.normal_()
    c.res_v.normal_()
    c.n_packed, c.n_res = t - RES, RES
    return c


def random_cq(b: int, t: int, per_head: bool = True):
    """A cq-4c8b cache of ``t`` tokens (1 fp16 sink, ``t - 1`` packed), per-head fp16 codebooks, pre-RoPE keys."""
    ck, cv = (torch.randn(H, 32, 256, 4, device="cuda").half() for _ in range(2))
    c = empty_vq_cache("cq", b, H, t - 1, 8, ck, cv, n_sink=1, pre_rope=True, rope_theta=500000.0)
    for x in (c.k_codes, c.v_codes):
        x.random_(0, 256)
    c.sink_k.normal_()
    c.sink_v.normal_()
    c.n_packed = t - 1
    return c


#: method -> (cache maker, decode function, module of the switch, switch, module of the warps, warps setting,
#: reference, key in ``decode_mma.COMPILED``)
METHODS = {"pq": (random_pq, pqd.decode_attention_pq, pqd, "PQ_MMA", pmma, "PQ_WARPS", decode_attention_pq_ref, "pq"),
           "cq": (random_cq, cqd.decode_attention_cq, cqd, "CQ_MMA", cmma, "CQ_WARPS", decode_attention_cq_ref, "cq")}


def run(contexts, batches, warps, per_head: bool, method: str = "pq") -> dict:
    make, fn, smod, switch, wmod, wname, reference, prog = METHODS[method]
    res = dict(device=torch.cuda.get_device_name(), copy_gbps=copy_bandwidth(), per_head=per_head, method=method,
               rows=[])
    print(f"{res['device']}: copy bandwidth {res['copy_gbps']:.0f} GB/s", flush=True)
    small = make(2, 4096, per_head)
    q = torch.randn(2, H * G, D, device="cuda", dtype=torch.float16)
    want = reference(q.float(), small)
    for w in warps:
        got = _timed({(wmod, wname): w}, fn, q, small, lambda f: f())
        res[f"check_rel_err_w{w}"] = err = ((got.float() - want).norm() / want.norm()).item()
        print(f"tensor-core program, {w} warps, against the reference: relative error {err:.2e}", flush=True)
    del small
    for t, b in itertools.product(contexts, batches):
        cache = make(b, t, per_head)
        q = torch.randn(b, H * G, D, device="cuda", dtype=torch.float16)
        kb = torch.randn(b, H, t, D, device="cuda", dtype=torch.float16)
        vb = torch.randn_like(kb)
        sdpa = graph_ms(functools.partial(F.scaled_dot_product_attention, q[:, :, None], kb, vb, enable_gqa=True))
        del kb, vb
        cores = _timed({(smod, switch): False}, fn, q, cache)
        nbytes = 2 * cache.k_codes[:, :, :cache.n_packed].numel()
        for w in warps:
            pf = {}
            if hasattr(wmod, "PREFETCH"):  # the program without its prefetch, beside it in the same run
                pf["mma_no_prefetch_us"] = 1e3 * _timed({(wmod, wname): w, (wmod, "PREFETCH"): False}, fn, q, cache)
                pf["no_prefetch_registers_spills"] = mma.COMPILED.get(prog)
            ms = _timed({(wmod, wname): w}, fn, q, cache)
            regs = mma.COMPILED.get(prog)
            split = _timed({(wmod, wname): w}, getattr(wmod, f"{method}_split"), q, cache, lambda f: f())[1]
            row = dict(context=t, batch=b, warps=w, registers_spills=regs, programs_per_sm=split, sdpa_us=sdpa * 1e3,
                       mma_us=ms * 1e3, cores_us=cores * 1e3, x_sdpa=sdpa / ms, cores_x_sdpa=sdpa / cores,
                       bandwidth_share=nbytes / (ms / 1e3) / (res["copy_gbps"] * 1e9), **pf)
            res["rows"].append(row)
            label = "pq-d2x8b" if method == "pq" else "cq-4c8b"
            no_pf = (f" | no prefetch {pf['mma_no_prefetch_us']:8.1f} us ({pf['no_prefetch_registers_spills']} "
                     "registers, spills)") if pf else ""
            print(f"{label} {t:8d} tokens, batch {b}, {w} warps ({regs} registers, spills; {split} programs an SM): "
                  f"SDPA {sdpa * 1e3:8.1f} us | tensor cores {ms * 1e3:8.1f} us ({sdpa / ms:.2f}x, "
                  f"{100 * row['bandwidth_share']:.0f}% of copy bandwidth) | CUDA cores {cores * 1e3:8.1f} us "
                  f"({sdpa / cores:.2f}x){no_pf}", flush=True)
        del cache
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="")
    ap.add_argument("--contexts", default="32768,131072,1048576")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--method", default="pq", choices=sorted(METHODS))
    ap.add_argument("--warps", default=None, help="warps a program, comma-separated (default: the module's)")
    ap.add_argument("--per-head", action="store_true")
    args = ap.parse_args()
    wmod, wname = METHODS[args.method][4:6]
    warps = [int(x) for x in args.warps.split(",")] if args.warps else [getattr(wmod, wname)]
    res = run([int(x) for x in args.contexts.split(",")], [int(x) for x in args.batches.split(",")], warps,
              args.per_head, args.method)
    res["argv"] = sys.argv
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
