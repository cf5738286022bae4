"""Probe the decode kernels' build variants against each other and fp16 SDPA (not a test: run it by hand).

    python bench/probe_decode_variants.py --out variants.json [--contexts 131072] [--check-only]

For Llama-2-7B heads (MHA 32 x 128) and Llama-3-8B heads (GQA 32/8 x 128), batch 1, it times one layer's decode
attention for kivi-2b and kvquant-2b-1% (KVQuant's own per-row sparse outliers), or ``--methods`` (any of
``bench_decode_attention.METHODS``), under each variant of the module switches of
``kvq_kernels.decode_attention`` and ``kvq_kernels.decode_token``:
  * ``F16_DOTS``: fp16 tensor-core operands instead of one-pass tf32;
  * ``FORCE_DOT``: MHA through ``tl.dot`` (one query row padded to 16) instead of CUDA-core tiles;
  * ``NUM_STAGES``: software-pipelining depth; ``block_n`` / ``num_warps`` / ``PROGRAMS_PER_SM``;
  * ``SWAP_AB``: the GQA dots with the dequantized tile as the MMA's first operand (1: scores, 2: and values);
  * ``KIVI_WORDS`` / ``TOKEN_WORDS``: kivi's / int's codes read as words with bit-trick floats (off: byte-wise);
    ``KIVI_PREFETCH`` / ``TOKEN_PREFETCH``: the next block's loads in flight; ``MAXNREG``: a register cap;
  * ``block_n`` / ``num_warps`` per call (``w1``, ``w2 bn16``, ...) and an occupancy sweep (``r<cap> s<stages>
    w<warps> p<programs per SM>``).
Each variant is first checked against the PyTorch reference at a small shape (relative error printed; a variant
above 2e-3 is reported and not timed). Prints one line per (shape, method, variant) with µs, x SDPA and the
share of copy bandwidth on the compressed bytes; writes JSON to --out. ``--check-only`` runs the checks (CPU:
``TRITON_INTERPRET=1``).
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
import kvq_kernels.decode_attention as da  # noqa: E402
import kvq_kernels.decode_token as dtk  # noqa: E402
from bench_decode_attention import METHODS, bench, copy_bandwidth, random_kivi, random_kvquant, random_token  # noqa: E402
from kvq_kernels import reference as ref  # noqa: E402
from kvq_kernels.token_reference import decode_attention_token_ref  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
MODELS = {"llama2-7b": (32, 1, 128), "llama3-8b": (8, 4, 128)}
PROBE_METHODS = ("kivi-2b", "kvquant-2b-1%-rows", "kvquant-2b-none")
METHODS = dict(METHODS, **{"kvquant-2b-none": METHODS["kvquant-2b-0%"]})

# (name, module switches, call kwargs)
VARIANTS = [
    ("base", {}, {}),  # the defaults (F16_DOTS on since session 7: "base" of the first run is "tf32" now)
    ("f16", {"F16_DOTS": True}, {}),
    ("f16+dot", {"F16_DOTS": True, "FORCE_DOT": True}, {}),
    ("f16 s2", {"F16_DOTS": True, "NUM_STAGES": 2}, {}),
    ("f16 s4", {"F16_DOTS": True, "NUM_STAGES": 4}, {}),
    ("f16 w8", {"F16_DOTS": True}, {"num_warps": 8}),
    ("f16 bn16", {"F16_DOTS": True}, {"block_n": 16}),
    ("f16 ppsm16", {"F16_DOTS": True, "PROGRAMS_PER_SM": 16}, {}),
    ("f16+dot w8", {"F16_DOTS": True, "FORCE_DOT": True}, {"num_warps": 8}),
    ("tf32", {"F16_DOTS": False}, {}),
    ("f16 swap k", {"F16_DOTS": True, "SWAP_AB": 1}, {}),  # session 8: key tile as the MMA's A operand
    ("f16 swap kv", {"F16_DOTS": True, "SWAP_AB": 2}, {}),
    ("no words", {"KIVI_WORDS": False}, {}),  # session 10: kivi's byte/join-tree expansion and int-to-float casts
    ("no prefetch", {"KIVI_PREFETCH": False}, {}),  # session 10: words, without the next block's loads in flight
    ("no token words", {"TOKEN_WORDS": False}, {}),  # session 10: int's byte-wise path
    ("no token prefetch", {"TOKEN_PREFETCH": False}, {}),
    ("w1", {}, {"num_warps": 1}),
    ("w2", {}, {"num_warps": 2}),
    ("w1 bn16", {}, {"num_warps": 1, "block_n": 16}),
    ("w2 bn16", {}, {"num_warps": 2, "block_n": 16}),
    ("no pf+ppsm3", {"KIVI_PREFETCH": False, "PROGRAMS_PER_SM": 3}, {}),
    ("no pf+ppsm6", {"KIVI_PREFETCH": False, "PROGRAMS_PER_SM": 6}, {}),
    ("ppsm3", {"PROGRAMS_PER_SM": 3}, {}),
    ("ppsm6", {"PROGRAMS_PER_SM": 6}, {}),
    ("ppsm4", {"PROGRAMS_PER_SM": 4}, {}),
    # timing ablations of kvquant (wrong results, not checked): no RoPE, no codebook lookup
    ("abl f16 norope", {"F16_DOTS": True, "ABLATE": 1}, {}),
    ("abl f16 nolut", {"F16_DOTS": True, "ABLATE": 2}, {}),
] + [  # session 10: occupancy sweep (register cap, pipelining stages, warps, programs per SM)
    (f"r{r or 0} s{s or 0} w{w} p{p}", {"MAXNREG": r, "NUM_STAGES": s, "PROGRAMS_PER_SM": p}, {"num_warps": w})
    for r in (None, 128, 96) for s in (None, 1, 2) for w in (4, 8) for p in (8, 16)
]
DEFAULTS = {k: getattr(da, k) for k in ("F16_DOTS", "FORCE_DOT", "NUM_STAGES", "PROGRAMS_PER_SM", "ABLATE",
                                         "SWAP_AB", "KIVI_WORDS", "KIVI_PREFETCH", "MAXNREG")}


TOKEN_DEFAULTS = {k: getattr(dtk, k) for k in ("TOKEN_WORDS", "TOKEN_PREFETCH")}
#: kind -> (random cache, kernel, reference)
KINDS = {"kvquant": (random_kvquant, da.decode_attention_kvquant, ref.decode_attention_kvquant_ref),
         "kivi": (random_kivi, da.decode_attention_kivi, ref.decode_attention_kivi_ref),
         "token": (random_token, dtk.decode_attention_token, decode_attention_token_ref)}


def switch(flags: dict) -> None:
    for k, v in DEFAULTS.items():
        setattr(da, k, flags.get(k, v))
    for k, v in TOKEN_DEFAULTS.items():
        setattr(dtk, k, flags.get(k, v))


def make(name, b, h, d, t):
    """-> (cache, kernel, reference) of a method of ``bench_decode_attention.METHODS``."""
    cfg = METHODS[name]
    rand, fn, want = KINDS[cfg["kind"]]
    return rand(b, h, d, t, cfg), fn, want


def check(name, h, g, flags, kw) -> float:
    """Relative error of the variant against the reference at a small shape (fp16 query)."""
    import bench_decode_attention as bda

    bda.DEV = DEV
    torch.manual_seed(0)
    cache, fn, fn_ref = make(name, 1, h, 128, 700)
    if METHODS[name]["kind"] == "kvquant":  # random codes: keep the thresholds sane
        cache.lo.fill_(-1.5)
        cache.hi.fill_(1.5)
    q = torch.randn(1, h * g, 128, device=DEV, dtype=torch.float16)
    switch(flags)
    out = fn(q, cache, **kw).float()
    want = fn_ref(q.float(), cache).float()
    switch({})
    return ((out - want).norm() / want.norm()).item()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--contexts", default="131072")
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--variants", default="", help="comma-separated subset of variant names")
    ap.add_argument("--methods", default=",".join(PROBE_METHODS), help="comma-separated subset of the methods")
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    want = set(filter(None, args.variants.split(",")))
    variants = [v for v in VARIANTS if not want or v[0] in want]
    results = dict(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu", rows=[], checks=[])
    ok = set()
    for (model, (h, g, _)), name, (vname, flags, kw) in itertools.product(MODELS.items(), methods, variants):
        if vname.startswith("abl"):
            ok.add((model, name, vname)) if name.startswith("kvquant") else None
            continue
        if DEV == "cpu" and g == 1 and not flags.get("FORCE_DOT"):
            h = 2  # (interpreter time)
        try:
            err = check(name, min(h, 4), g, flags, kw)
        except Exception as e:  # noqa: BLE001 - report the variant and go on
            err = float("nan")
            print(f"check {model} {name} {vname}: {type(e).__name__}: {str(e).splitlines()[0][:160]}", flush=True)
        results["checks"].append(dict(model=model, method=name, variant=vname, rel_err=err))
        print(f"check {model:10s} {name:20s} {vname:12s} rel err {err:.2e}", flush=True)
        if err < 2e-3:
            ok.add((model, name, vname))
    if not args.check_only:
        bw = copy_bandwidth()
        results["copy_gbs"] = bw
        print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
        for t in map(int, args.contexts.split(",")):
            for model, (h, g, d) in MODELS.items():
                kb = torch.randn(1, h, t, d, device=DEV, dtype=torch.float16)
                vb = torch.randn_like(kb)
                q = torch.randn(1, h * g, d, device=DEV, dtype=torch.float16)
                sdpa = min(bench(functools.partial(F.scaled_dot_product_attention, q.view(1, h * g, 1, d), kb, vb,
                                                   enable_gqa=g > 1)),
                           bench(functools.partial(F.scaled_dot_product_attention, q.view(1, h, g, d), kb, vb)))
                del kb, vb
                print(f"{model} {t}: fp16 SDPA {sdpa * 1e3:.1f} us", flush=True)
                for name in methods:
                    cache, fn, _ = make(name, 1, h, d, t)
                    nbytes = cache.compressed_bytes()
                    for vname, flags, kw in variants:
                        if (model, name, vname) not in ok:
                            continue
                        switch(flags)
                        try:
                            ms = bench(functools.partial(fn, q, cache, **kw))
                        except Exception as e:  # noqa: BLE001
                            print(f"  {name} {vname}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                            continue
                        finally:
                            switch({})
                        row = dict(model=model, context=t, method=name, variant=vname, us=ms * 1e3,
                                   sdpa_us=sdpa * 1e3, x_sdpa=sdpa / ms, bytes=nbytes,
                                   bw_share=nbytes / (ms * 1e-3) / (bw * 1e9))
                        results["rows"].append(row)
                        print(f"  {model:10s} {t:8d} {name:20s} {vname:12s} {ms * 1e3:8.1f} us  "
                              f"{sdpa / ms:5.2f}x SDPA  {100 * row['bw_share']:5.1f}% of copy bw", flush=True)
                    del cache
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
