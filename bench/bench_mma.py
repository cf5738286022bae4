"""GQA decode attention on a GPU (not a test): the Gluon programs (``decode_mma``: int 2/4-bit; ``decode_mma_kivi``:
KIVI 2-bit; ``decode_mma_kvquant``: kvq2, kvq4, kvq2-1%; ``decode_mma_nf``: nf2, nf4) against fp16 SDPA and the
``tl.dot`` programs they replace, all in one run, and a sweep of their tile and occupancy settings.

    python bench/bench_mma.py --out mma.json [--contexts 32768,131072,1048576] [--batches 1,8]
                              [--methods int2,int4,kivi2,kvq2,kvq2-1%,nf4,kvq2-bytes,nf2-bytes] [--sweep]

Times the decode function as the runtime calls it (the Gluon packed splits, the fp16-segment split, the merge) with
the Gluon path's switch on and off (``decode_token.TOKEN_MMA``, ``decode_attention.KIVI_MMA``), replayed from CUDA
graphs as ``kvq generate`` runs it, L2 flushed before every call (``graph_ms``), at Llama-3-8B's heads (8 KV heads,
4 query heads each, D = 128), and ``F.scaled_dot_product_attention(enable_gqa=True)`` over fp16 K/V of the same shape
the same way; also the host time a call takes to issue (what eager use, ``--no-graphs``, pays). First each method's
Gluon path against its reference. ``--sweep``: warps a program, tokens a warp and programs an SM
and a register cap (``decode_mma.WARPS``, ``BLOCK``, ``PROGRAMS_PER_SM``, ``MAXNREG``) at each context and batch, with
counts on the device (the variant ``kvq generate``'s graphs run), and the registers and spills each compiled to.
A ``-bytes`` suffix (``kvq2-bytes``, ``kvq2-1%-bytes``, ``nf2-bytes``) times the Gluon path with
``decode_mma_kvquant.VALUE_NIBBLES`` off (2-bit value lookups from byte permutes, the default until session 15), to
set beside the plain name in the same run; ``-nib`` forces it on. ``-pf`` / ``-nopf`` (nf only) time it with every
variant / no variant of ``decode_mma_nf.PREFETCH`` (each tile's codes loaded a tile ahead; default: nf2 with device
counts only).
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
import kvq_kernels.decode_attention as da  # noqa: E402
import kvq_kernels.decode_mma as mma  # noqa: E402
import kvq_kernels.decode_mma_kivi as kmma  # noqa: E402
import kvq_kernels.decode_mma_kvquant as qmma  # noqa: E402
import kvq_kernels.decode_mma_nf as nmma  # noqa: E402
import kvq_kernels.decode_token as dtk  # noqa: E402
from bench_decode_attention import METHODS, copy_bandwidth, random_kivi, random_kvquant, random_token  # noqa: E402
from kvq_kernels import reference as ref  # noqa: E402
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


def _timed(settings: dict, fn, q, cache, what=graph_ms, **kw) -> float:
    """``what`` of ``fn(q, cache, **kw)`` with module settings ``{(module, name): value}``, restored after."""
    old = {k: getattr(*k) for k in settings}
    try:
        for (mod, name), v in settings.items():
            setattr(mod, name, v)
        return what(functools.partial(fn, q, cache, **kw))
    finally:
        for (mod, name), v in old.items():
            setattr(mod, name, v)


def _rel_err(call, want) -> float:
    return ((call().float() - want).norm() / want.norm()).item()


#: method name suffixes that time the Gluon path with ``decode_mma_kvquant.VALUE_NIBBLES`` on / off (kvq2*, nf2)
NIB, BYTES = "-nib", "-bytes"
#: suffixes that time nf's program with every / no variant of ``decode_mma_nf.PREFETCH``
PF, NOPF = "-pf", "-nopf"
SUFFIXES = (NIB, BYTES, PF, NOPF)


def _base(name: str) -> str:
    """The method of a name without its suffix."""
    return next((name.removesuffix(x) for x in SUFFIXES if name.endswith(x)), name)


def _extra(name: str) -> dict:
    """Settings a method name's suffix adds to its Gluon path's switch."""
    if name.endswith(NIB) or name.endswith(BYTES):
        return {(qmma, "VALUE_NIBBLES"): name.endswith(NIB)}
    if name.endswith(PF) or name.endswith(NOPF):
        every = frozenset((b, d) for b in (2, 4) for d in (False, True))
        return {(nmma, "PREFETCH"): every if name.endswith(PF) else frozenset()}
    return {}


def _methods() -> dict:
    """name -> (cache maker, decode function, switch of the Gluon path, its gate, the reference)."""
    return {
        "int2": (functools.partial(random_token, cfg=METHODS["int2"]), dtk.decode_attention_token,
                 (dtk, "TOKEN_MMA"), mma.mma_supported, decode_attention_token_ref),
        "int4": (functools.partial(random_token, cfg=METHODS["int4"]), dtk.decode_attention_token,
                 (dtk, "TOKEN_MMA"), mma.mma_supported, decode_attention_token_ref),
        "kivi2": (functools.partial(random_kivi, cfg=METHODS["kivi-2b"]), da.decode_attention_kivi,
                  (da, "KIVI_MMA"), kmma.kivi_mma_supported, ref.decode_attention_kivi_ref),
        **{name: (functools.partial(random_kvquant, cfg=METHODS[cfg]), da.decode_attention_kvquant,
                  (da, "KVQ_MMA"), qmma.kvq_mma_supported, ref.decode_attention_kvquant_ref)
           for name, cfg in (("kvq2", "kvquant-2b-0%"), ("kvq4", "kvquant-4b-1%-rows"),
                             ("kvq2-1%", "kvquant-2b-1%-rows"))},
        **{f"nf{b}": (functools.partial(random_token, cfg=dict(METHODS["nf4"], bits=b)), dtk.decode_attention_token,
                      (dtk, "NF_MMA"), nmma.nf_mma_supported, decode_attention_token_ref) for b in (2, 4)},
    }


#: (warps a program, tokens a warp, programs an SM, register cap) settings ``--sweep`` times; a cap of ``64K / (32 *
#: warps * programs)`` registers a thread lets all of a wave's programs be resident at once
#: ``None`` programs an SM: as many as the registers allow (``decode_mma.resident``, the default)
SWEEP = ((2, 32, None, None), (1, 32, None, None), (4, 32, None, None), (4, 16, None, None), (2, 32, 4, None),
         (2, 32, 6, None), (2, 32, None, 168), (2, 32, None, 128))


def run(contexts, batches, names, sweep: bool) -> dict:
    res = dict(device=torch.cuda.get_device_name(), copy_gbps=copy_bandwidth(), rows=[], sweep=[])
    print(f"{res['device']}: copy bandwidth {res['copy_gbps']:.0f} GB/s", flush=True)
    table = _methods()
    for name in names:
        make, fn, switch, _, reference = table[_base(name)]
        small = make(2, 3, D, 1056)  # (kivi packs whole 32-token groups: 1056 - 128 residual tokens)
        q = torch.randn(2, 3 * G, D, device="cuda", dtype=torch.float16)
        want = reference(q.float(), small)
        err = _timed({switch: True, **_extra(name)}, fn, q, small, functools.partial(_rel_err, want=want))
        res[f"check_rel_err_{name}"] = err
        print(f"{name} (Gluon path) against the reference: relative error {err:.2e}", flush=True)
    for name, t, b in itertools.product(names, contexts, batches):
        make, fn, switch, supported, _ = table[_base(name)]
        on_set = {switch: True, **_extra(name)}
        # its key in ``decode_mma.COMPILED``
        prog = next(p for p in ("kivi", "kvquant", "nf", "int") if name.startswith(p[:3]))
        cache = make(b, H, D, t)
        q = torch.randn(b, H * G, D, device="cuda", dtype=torch.float16)
        assert supported(q, cache), name
        kb = torch.randn(b, H, t, D, device="cuda", dtype=torch.float16)
        vb = torch.randn_like(kb)
        sdpa = graph_ms(functools.partial(F.scaled_dot_product_attention, q[:, :, None], kb, vb, enable_gqa=True))
        del kb, vb
        on = _timed(on_set, fn, q, cache)
        off = _timed({switch: False}, fn, q, cache)
        # counts on the device, as ``kvq generate``'s captured steps read them (another compiled variant)
        lens = torch.tensor([cache.n_packed, cache.n_res, 0, 0], dtype=torch.int64, device="cuda")
        on_dyn = _timed(on_set, fn, q, cache, lens=lens)
        dyn_regs = mma.COMPILED.get(prog)
        off_dyn = _timed({switch: False}, fn, q, cache, lens=lens)
        hosts = dict(mma_host_us=_timed(on_set, fn, q, cache, host_us),
                     dot_host_us=_timed({switch: False}, fn, q, cache, host_us))
        nbytes = cache.compressed_bytes()
        regs = mma.COMPILED.get(prog)  # the host-count launch, the last one (``host_us``)
        row = dict(method=name, context=t, batch=b, registers_spills=regs, sdpa_us=sdpa * 1e3, mma_us=on * 1e3,
                   dot_us=off * 1e3, x_sdpa=sdpa / on, dot_x_sdpa=sdpa / off, dyn_registers_spills=dyn_regs,
                   mma_dyn_us=on_dyn * 1e3, dot_dyn_us=off_dyn * 1e3, dyn_x_sdpa=sdpa / on_dyn,
                   dot_dyn_x_sdpa=sdpa / off_dyn,
                   bandwidth_share=nbytes / (on / 1e3) / (res["copy_gbps"] * 1e9), **hosts)
        res["rows"].append(row)
        print(f"{name} {t:8d} tokens, batch {b}: SDPA {sdpa * 1e3:7.1f} us | Gluon {on * 1e3:7.1f} us "
              f"({sdpa / on:.2f}x, {100 * row['bandwidth_share']:.0f}% of copy bandwidth) | tl.dot "
              f"{off * 1e3:7.1f} us ({sdpa / off:.2f}x) | host per call: Gluon {hosts['mma_host_us']:.0f} us, "
              f"tl.dot {hosts['dot_host_us']:.0f} us\n    counts on the device: Gluon {on_dyn * 1e3:7.1f} us "
              f"({sdpa / on_dyn:.2f}x, {dyn_regs} registers, spills) | tl.dot {off_dyn * 1e3:7.1f} us "
              f"({sdpa / off_dyn:.2f}x)", flush=True)
        if sweep:  # with counts on the device (the variant ``kvq generate`` runs)
            for w, bn, k, cap in SWEEP:
                if prog != "int" and bn != 32:
                    continue  # 32 tokens a warp (KIVI: one key group; kvquant and nf: the in-warp tables)
                s = {**on_set, (mma, "WARPS"): w, (mma, "BLOCK"): bn, (mma, "PROGRAMS_PER_SM"): k,
                     (mma, "MAXNREG"): cap}
                ms = _timed(s, fn, q, cache, lens=lens)
                regs, spills = mma.COMPILED.get(prog, (None, None))
                k = k or (regs and mma.resident(regs, w))
                res["sweep"].append(dict(method=name, context=t, batch=b, warps=w, block=bn, programs_per_sm=k,
                                         maxnreg=cap, registers=regs, spilled_bytes=spills, us=ms * 1e3,
                                         x_sdpa=sdpa / ms))
                print(f"   batch {b}, {w} warps x {bn} tokens, {k} programs an SM, register cap {cap} ({regs} "
                      f"registers, {spills} spilled): {ms * 1e3:7.1f} us ({sdpa / ms:.2f}x)", flush=True)
        del cache
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="")
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--batches", default="1")
    ap.add_argument("--methods", default="int2,int4,kivi2")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps(mma.compiled_counts(), indent=1))  # no GPU: what the compiler makes of it
        return
    res = run([int(x) for x in args.contexts.split(",")], [int(x) for x in args.batches.split(",")],
              args.methods.split(","), args.sweep)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
