"""int 2- and 4-bit GQA decode attention on a GPU (not a test): ``decode_mma``'s Gluon program against fp16 SDPA and
the ``tl.dot`` programs it replaces, all in one run, and a sweep of its tile and occupancy settings.

    python bench/bench_int_mma.py --out int-mma.json [--contexts 32768,131072,1048576] [--batches 1,8] [--bits 2,4]
                                  [--sweep]

Times ``decode_attention_token`` as the runtime calls it (the Gluon packed splits, the fp16-segment split, the
merge) with ``TOKEN_MMA`` on and off, replayed from CUDA graphs as ``kvq generate`` runs it, L2 flushed before every
call (``graph_ms``), at Llama-3-8B's heads (8 KV heads, 4 query heads each, D = 128), and
``F.scaled_dot_product_attention(enable_gqa=True)`` over fp16 K/V of the same shape the same way; also the host time
a call takes to issue (what eager use, ``--no-graphs``, pays). ``--sweep``: warps a program, tokens a warp and
programs an SM (``decode_mma.WARPS``, ``BLOCK``, ``PROGRAMS_PER_SM``) at each context, batch 1.
Results: ``docs/results/kernels-decode-attention.md`` (session 11).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import kvq_kernels.decode_mma as mma  # noqa: E402
import kvq_kernels.decode_token as dtk  # noqa: E402
from bench_decode_attention import METHODS, copy_bandwidth, random_token  # noqa: E402
from kvq_kernels.token_reference import decode_attention_token_ref  # noqa: E402

H, G, D = 8, 4, 128


_FLUSH = {}


def graph_ms(fn, reps: int = 20) -> float:
    """Device ms of ``fn`` replayed from a CUDA graph (as ``kvq generate`` runs it: no host launch cost), with L2
    flushed before every call as in a real step (other layers' weights and caches pass through L2 in between): a
    graph of ``reps`` (flush, fn) pairs minus a graph of ``reps`` flushes, the median of 10 replays each."""
    if "buf" not in _FLUSH:
        _FLUSH["buf"] = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    flush = _FLUSH["buf"].zero_
    fn()  # compile outside the capture
    torch.cuda.synchronize()

    def replay_ms(body) -> float:
        s = torch.cuda.Stream()
        with torch.cuda.stream(s):
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(reps):
                    body()
            torch.cuda.synchronize()
            times = []
            for _ in range(10):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                g.replay()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / reps)
        return sorted(times)[len(times) // 2]

    return replay_ms(lambda: (flush(), fn())) - replay_ms(flush)


def host_us(fn, n: int = 50) -> float:
    """Host microseconds a call takes to issue (eager use: ``--no-graphs``, prefill-free benches)."""
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    dt = time.perf_counter() - t
    torch.cuda.synchronize()
    return dt / n * 1e6


def _timed(settings: dict, q, cache, what=graph_ms) -> float:
    """``what`` of ``decode_attention_token(q, cache)`` with module settings ``{(module, name): value}``, restored
    after."""
    old = {k: getattr(*k) for k in settings}
    try:
        for (mod, name), v in settings.items():
            setattr(mod, name, v)
        return what(functools.partial(dtk.decode_attention_token, q, cache))
    finally:
        for (mod, name), v in old.items():
            setattr(mod, name, v)


def run(contexts, batches, bits_list, sweep: bool) -> dict:
    res = dict(device=torch.cuda.get_device_name(), copy_gbps=copy_bandwidth(), rows=[], sweep=[])
    print(f"{res['device']}: copy bandwidth {res['copy_gbps']:.0f} GB/s", flush=True)
    for bits in bits_list:
        small = random_token(2, 3, D, 1000, METHODS[f"int{bits}"])
        q = torch.randn(2, 3 * G, D, device="cuda", dtype=torch.float16)
        want = decode_attention_token_ref(q.float(), small)
        err = ((dtk.decode_attention_token(q, small).float() - want).norm() / want.norm()).item()
        res[f"check_rel_err_int{bits}"] = err
        print(f"int{bits} check against the reference: relative error {err:.2e}", flush=True)
    for bits, t, b in itertools.product(bits_list, contexts, batches):
        cache = random_token(b, H, D, t, METHODS[f"int{bits}"])
        q = torch.randn(b, H * G, D, device="cuda", dtype=torch.float16)
        assert mma.mma_supported(q, cache)
        kb = torch.randn(b, H, t, D, device="cuda", dtype=torch.float16)
        vb = torch.randn_like(kb)
        sdpa = graph_ms(functools.partial(F.scaled_dot_product_attention, q[:, :, None], kb, vb, enable_gqa=True))
        del kb, vb
        on = _timed({}, q, cache)
        off = _timed({(dtk, "TOKEN_MMA"): False}, q, cache)
        hosts = dict(mma_host_us=_timed({}, q, cache, host_us),
                     dot_host_us=_timed({(dtk, "TOKEN_MMA"): False}, q, cache, host_us))
        nbytes = sum(x.numel() * x.element_size() for x in (cache.k_packed, cache.v_packed, cache.k_scale,
                                                             cache.k_zero, cache.v_scale, cache.v_zero))
        row = dict(bits=bits, context=t, batch=b, sdpa_us=sdpa * 1e3, mma_us=on * 1e3, dot_us=off * 1e3,
                   x_sdpa=sdpa / on, dot_x_sdpa=sdpa / off,
                   bandwidth_share=nbytes / (on / 1e3) / (res["copy_gbps"] * 1e9), **hosts)
        res["rows"].append(row)
        print(f"int{bits} {t:8d} tokens, batch {b}: SDPA {sdpa * 1e3:7.1f} us | Gluon {on * 1e3:7.1f} us "
              f"({sdpa / on:.2f}x, "
              f"{100 * row['bandwidth_share']:.0f}% of copy bandwidth) | tl.dot {off * 1e3:7.1f} us "
              f"({sdpa / off:.2f}x) | host per call: Gluon {hosts['mma_host_us']:.0f} us, tl.dot "
              f"{hosts['dot_host_us']:.0f} us", flush=True)
        if sweep and b == 1:
            for w, bn, k in ((4, 32, 2), (4, 32, 3), (4, 16, 3), (4, 16, 4), (2, 32, 4), (2, 32, 6)):
                s = {(mma, "WARPS"): w, (mma, "BLOCK"): bn, (mma, "PROGRAMS_PER_SM"): k}
                ms = _timed(s, q, cache)
                res["sweep"].append(dict(bits=bits, context=t, warps=w, block=bn, programs_per_sm=k, us=ms * 1e3,
                                         x_sdpa=sdpa / ms))
                print(f"   {w} warps x {bn} tokens, {k} programs an SM: {ms * 1e3:7.1f} us ({sdpa / ms:.2f}x)",
                      flush=True)
        del cache
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--bits", default="2,4")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps(mma.compiled_counts(), indent=1))  # no GPU: what the compiler makes of it
        return
    res = run([int(x) for x in args.contexts.split(",")], [int(x) for x in args.batches.split(",")],
              [int(x) for x in args.bits.split(",")], args.sweep)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
