"""Time packed-cache decode attention on a GPU (not a test: run it by hand).

    python bench/bench_decode_attention.py --out results.json [--tune] [--quick]

For Llama-2-7B heads (32 KV heads x 128, MHA) and Llama-3-8B heads (32 query / 8 KV heads, D=128), batch 1
and 8, contexts 4K..1M (while two fp16 K/V copies fit), it times one decode step of one layer:
  * fp16 SDPA: torch.nn.functional.scaled_dot_product_attention on fp16 K/V, the faster of two layouts:
    the G query heads of a KV head passed as G query rows, and (GQA) ``enable_gqa=True`` with one query row
    per head (the rows layout starves SDPA at batch 1 with few KV heads);
  * ours: kvquant 4-bit-1% and 2-bit-1% with KVQuant's own outliers as the runtime stores them (``-rows``:
    per-row sparse entries, 1% of the key and of the value entries; 4 sink tokens, 32 residual), kvquant
    2-bit without outliers (``-0%``, the dense part alone), kivi 2-bit (128 residual), and the
    per-token-vector methods int 4/2-bit and nf 4-bit (``kvq_kernels.decode_token``; no sink, no residual, as
    kvq's defaults), straight from the packed cache;
  * dequantize-then-SDPA: our Triton dequantize of the packed segment into fp16 buffers, then SDPA (kvquant and
    kivi; int / nf have no dequantize kernel: n/a);
  * quantize-and-append of one new token as the runtime does it (kvquant: keys and values with KVQuant's
    outliers, ``kvq_cli.runtime.fused``, host work included; kivi: one group of 32 tokens; int / nf: the method's
    PyTorch encode and bit packing of one token's keys and values) vs the decode step.
It also measures device copy bandwidth (bytes read + written) and reports the bandwidth achieved on the
compressed bytes. Medians of triton.testing.do_bench. Prints a markdown table; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time

import torch
import torch.nn.functional as F
import triton
from kvq_kernels import reference as ref
from kvq_kernels.decode_attention import (
    decode_attention_kivi,
    decode_attention_kvquant,
    dequantize_packed_kivi,
    dequantize_packed_kvquant,
)
from kvq_kernels.decode_token import decode_attention_token
from kvq_kernels.pack import quantize_append_kivi
from kvq_kernels.token_reference import TokenCache, decode_attention_token_ref, pack_token_codes
from triton.testing import do_bench

MODELS = {"llama2-7b": (32, 1, 128), "llama3-8b": (8, 4, 128)}  # KV heads, G, D
METHODS = {
    "kivi-2b": dict(kind="kivi", bits=2, sink=0, res=128),
    "kivi-4b": dict(kind="kivi", bits=4, sink=0, res=128),
    "kvquant-2b-0%": dict(kind="kvquant", bits=2, sink=4, res=32),
    # KVQuant's own outliers as the runtime stores them: per-row sparse entries (kvq_kernels.sparse), 1% of
    # the key and 1% of the value entries at random positions
    "kvquant-4b-1%-rows": dict(kind="kvquant", bits=4, sink=4, res=32, rows=0.01),
    "kvquant-2b-1%-rows": dict(kind="kvquant", bits=2, sink=4, res=32, rows=0.01),
    # per-token vectors (kvq's int / nf): one fp16 scale (+ zero for int) per token-head, codes packed as kivi's
    "int4": dict(kind="token", method="int", bits=4, sink=0, res=0),
    "int2": dict(kind="token", method="int", bits=2, sink=0, res=0),
    "nf4": dict(kind="token", method="nf", bits=4, sink=0, res=0),
}
DEV = "cuda"


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth() -> float:
    x = torch.empty(2 << 30, dtype=torch.uint8, device=DEV).random_()
    y = torch.empty_like(x)
    ms = bench(functools.partial(y.copy_, x))
    return 2 * (2 << 30) / ms / 1e6  # GB/s


def random_kvquant(b, h, d, t, cfg):
    n_packed = t - cfg["sink"] - cfg["res"]
    bits = cfg["bits"]
    lo, hi = -1 - torch.rand(h, d, device=DEV), 1 + torch.rand(h, d, device=DEV)
    cb = torch.sort(torch.rand(1 << bits, device=DEV) * 2 - 1).values
    c = ref.KVQuantCache.empty(b, h, d, n_packed, bits, bits, lo, hi, cb, cb.clone(), n_sink=cfg["sink"],
                               max_res=cfg["res"], device=DEV)
    for x in (c.k_packed, c.v_packed):
        x.random_(0, 256)
    for x in (c.v_min, c.sink_k, c.sink_v, c.res_k, c.res_v):
        x.normal_()
    c.v_scale.uniform_(0.5, 2)
    c.n_packed, c.n_res = n_packed, cfg["res"]
    if cfg.get("rows"):
        c.k_sparse, c.v_sparse = random_rows(b, h, d, n_packed, cfg["rows"]), random_rows(b, h, d, n_packed,
                                                                                             cfg["rows"])
    return c


def random_rows(b, h, d, t, frac, chunk=16384):
    """Per-row sparse outliers at a fraction ``frac`` of random positions, built ``chunk`` tokens at a time."""
    from kvq_kernels.sparse import SparseRows

    rows = SparseRows(b, h, d, DEV, capacity=int(t * d * frac * 1.1) + 64)
    for t0 in range(0, t, chunk):
        n = min(chunk, t - t0)
        rows.append(torch.rand(b, h, n, d, device=DEV) < frac, torch.randn(b, h, n, d, device=DEV))
    return rows


def random_kivi(b, h, d, t, cfg):
    n_packed = t - cfg["sink"] - cfg["res"]
    c = ref.KIVICache.empty(b, h, d, n_packed, cfg["bits"], n_sink=cfg["sink"], max_res=cfg["res"], device=DEV)
    for x in (c.k_packed, c.v_packed):
        x.random_(0, 256)
    for x in (c.k_zero, c.v_zero, c.sink_k, c.sink_v, c.res_k, c.res_v):
        x.normal_()
    for x in (c.k_scale, c.v_scale):
        x.uniform_(0.01, 0.5)
    c.n_packed, c.n_res = n_packed, cfg["res"]
    return c


def _levels(cfg):
    """The level table of a per-token config (nf: the NormalFloat codebook; int: None, the codes themselves)."""
    from kvq_cli.methods.quant_ops import normal_float_codebook

    return normal_float_codebook(cfg["bits"]).to(DEV) if cfg["method"] == "nf" else None


def random_token(b, h, d, t, cfg):
    n_packed = t - cfg["sink"] - cfg["res"]
    c = TokenCache.empty(b, h, d, n_packed, cfg["bits"], levels=_levels(cfg), zero=cfg["method"] == "int",
                         n_sink=cfg["sink"], max_res=cfg["res"], device=DEV)
    for x in (c.k_packed, c.v_packed):
        x.random_(0, 256)
    for x in (c.k_zero, c.v_zero, c.sink_k, c.sink_v, c.res_k, c.res_v):
        if x is not None:
            x.normal_()
    for x in (c.k_scale, c.v_scale):
        x.uniform_(0.01, 0.5)
    c.n_packed, c.n_res = n_packed, cfg["res"]
    return c


def token_append_ms(b, h, d, cfg) -> float:
    """One token's keys and values through the int / nf method's own encode and the bit packing, as the runtime
    stores them (``PackedStore.append``; there is no fused append kernel for them)."""
    from kvq_cli.methods import make_method

    method = make_method(cfg["method"], bits=cfg["bits"])
    x = torch.randn(b, h, 1, d, device=DEV, dtype=torch.float16)

    def step():
        for enc in (method.encode_keys(x, {}), method.encode_values(x, {})):
            pack_token_codes(enc["codes"], cfg["bits"])

    return bench(step)


#: per kind: random cache, decode attention, dequantize kernel (None: none)
KINDS = {
    "kvquant": (random_kvquant, decode_attention_kvquant, dequantize_packed_kvquant),
    "kivi": (random_kivi, decode_attention_kivi, dequantize_packed_kivi),
    "token": (random_token, decode_attention_token, None),
}


def runtime_append_ms(b, h, d, bits) -> float:
    """One token's quantize-and-append into a kvquant-``bits``-1% layer as the runtime does it: keys and values,
    KVQuant's outliers into per-row sparse storage (``kvq_cli.runtime.fused``), host work included
    (``bench_append``'s setup)."""
    from bench_append import fused_step, setup

    _, state, pairs, x = setup(b, h, bits, d)
    return bench(functools.partial(fused_step, pairs, x, state))


BROKEN: set = set()  # (method, G) that failed to compile or to match the reference


def correctness() -> list[str]:
    """Kernels vs references at one small shape on the GPU."""
    notes = []
    for (name, cfg), g in [(x, g) for x in METHODS.items() for g in (1, 4) if not x[1].get("rows")]:
        try:
            notes += _check_one(name, cfg, g)
        except Exception as e:  # noqa: BLE001 - report and skip that variant
            BROKEN.add((name, g))
            notes.append(f"{name} G={g}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return notes


def _check_one(name, cfg, g) -> list[str]:
    notes = []
    gen = torch.Generator(device="cpu").manual_seed(0)
    b, h, d, t = 2, 4, 128, 301
    for _ in range(1):
        k = (torch.randn(b, h, t, d, generator=gen) * 1.3).to(DEV)
        v = torch.randn(b, h, t, d, generator=gen).to(DEV)
        q = torch.randn(b, h * g, d, generator=gen).to(DEV)
        if cfg["kind"] == "kvquant":
            lo, hi = -1.5 * torch.ones(h, d, device=DEV), 1.5 * torch.ones(h, d, device=DEV)
            cb = torch.sort(torch.rand(1 << cfg["bits"], generator=gen) * 2 - 1).values.to(DEV)
            c2 = ref.KVQuantCache.empty(b, h, d, t, cfg["bits"], cfg["bits"], lo, hi, cb, cb, device=DEV)
            ref.append_kvquant_ref(c2, k, v, 0)  # (the runtime's fused append: tests/test_append.py)
            c1, fields = c2, ()
            att, att_ref = decode_attention_kvquant, ref.decode_attention_kvquant_ref
        elif cfg["kind"] == "token":  # (the runtime's append is the method's encode: tests/test_token_kernels.py)
            c2 = TokenCache.empty(b, h, d, t, cfg["bits"], levels=_levels(cfg), zero=cfg["method"] == "int",
                                  device=DEV)
            c2.append(k, v, 0)
            c1, fields = c2, ()
            att, att_ref = decode_attention_token, decode_attention_token_ref
        else:
            c1 = ref.KIVICache.empty(b, h, d, t, cfg["bits"], device=DEV)
            c2 = ref.KIVICache.empty(b, h, d, t, cfg["bits"], device=DEV)
            ref.append_kivi_ref(c1, k, v, 0)
            quantize_append_kivi(c2, k, v, 0)
            fields = ("k_packed", "k_scale", "k_zero", "v_packed", "v_scale", "v_zero")
            att, att_ref = decode_attention_kivi, ref.decode_attention_kivi_ref
        for f in fields:
            a, e = getattr(c1, f), getattr(c2, f)
            if not torch.equal(a, e):
                notes.append(f"{name}: append field {f} differs in {(a != e).sum().item()} of {a.numel()} entries")
        c2.n_packed = t
        err = ((att(q, c2).float() - att_ref(q, c2).float()).norm() / att_ref(q, c2).float().norm()).item()
        notes.append(f"{name} G={g}: decode attention rel. error vs reference {err:.2e}")
        if not err < 2e-3:
            raise RuntimeError(f"correctness check failed: {notes[-1]}")
    return notes


def deq_then_sdpa(deq, cache, q4, kbuf, vbuf, offset):
    deq(cache, kbuf, vbuf, offset=offset)
    return F.scaled_dot_product_attention(q4, kbuf, vbuf)


def tune(configs):
    """Pick (block_n, num_warps) per (method, G) at 128K tokens, batch 1."""
    best = {}
    rows = []
    for model, (h, g, d) in MODELS.items():
        for name, cfg in METHODS.items():
            mk, fn, _ = KINDS[cfg["kind"]]
            cache = mk(1, h, d, 131072, cfg)
            q = torch.randn(1, h * g, d, device=DEV, dtype=torch.float16)
            times = {}
            for bn, nw in configs:
                try:
                    times[(bn, nw)] = bench(functools.partial(fn, q, cache, block_n=bn, num_warps=nw))
                except Exception as e:  # noqa: BLE001 - a config may not compile (resources)
                    print(f"tune {model} {name} {bn}/{nw}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
            if not times:
                continue
            k = min(times, key=times.get)
            best[(name, g)] = k
            rows.append((model, name, {f"{a}/{b}": round(t * 1e3, 1) for (a, b), t in times.items()}, k))
            print(f"tune {model:10s} {name:14s} us by block_n/warps: {rows[-1][2]}", flush=True)
            del cache
    for r in rows:
        print(f"tune {r[0]:10s} {r[1]:14s} us by block_n/warps: {r[2]} -> {r[3]}")
    return best


def run(contexts, batches, best, bw_copy):
    results = []
    for model, (h, g, d) in MODELS.items():
        for b in batches:
            for t in contexts:
                fp16_bytes = 2 * b * h * t * d * 2
                if fp16_bytes > 36e9 or (b > 1 and t > 131072):
                    continue
                kbuf = torch.randn(b, h, t, d, device=DEV, dtype=torch.float16)
                vbuf = torch.randn(b, h, t, d, device=DEV, dtype=torch.float16)
                q = torch.randn(b, h * g, d, device=DEV, dtype=torch.float16)
                q4 = q.view(b, h, g, d)
                rows_ms = bench(functools.partial(F.scaled_dot_product_attention, q4, kbuf, vbuf))
                gqa_ms = rows_ms if g == 1 else bench(functools.partial(
                    F.scaled_dot_product_attention, q.view(b, h * g, 1, d), kbuf, vbuf, enable_gqa=True))
                sdpa_ms = min(rows_ms, gqa_ms)  # the stronger of the two layouts is the baseline
                row = dict(model=model, batch=b, context=t, fp16_kv_bytes=fp16_bytes, sdpa_ms=sdpa_ms,
                           sdpa_rows_ms=rows_ms, sdpa_gqa_ms=gqa_ms, sdpa_gbs=fp16_bytes / sdpa_ms / 1e6, methods={})
                for name, cfg in METHODS.items():
                    if (name, g) in BROKEN:
                        continue
                    kv = cfg["kind"] == "kvquant"
                    mk, fn, deq = KINDS[cfg["kind"]]
                    cache = mk(b, h, d, t, cfg)
                    bn, nw = best.get((name, g), (None, None))
                    ours = bench(functools.partial(fn, q, cache, block_n=bn, num_warps=nw))
                    deq_ms = float("nan") if cfg.get("rows") or deq is None else bench(  # (ours skips sparse rows)
                        functools.partial(deq_then_sdpa, deq, cache, q4, kbuf, vbuf, cfg["sink"]))
                    if kv:
                        app, app_tokens = runtime_append_ms(b, h, d, cfg["bits"]), 1
                    elif cfg["kind"] == "token":
                        app, app_tokens = token_append_ms(b, h, d, cfg), 1
                    else:
                        k32 = torch.randn(b, h, 32, d, device=DEV, dtype=torch.float16)
                        off = (cache.n_packed // 32 - 1) * 32
                        app = bench(functools.partial(quantize_append_kivi, cache, k32, k32, off))
                        app_tokens = 32
                    cbytes = cache.compressed_bytes()
                    row["methods"][name] = dict(
                        ms=ours, deq_sdpa_ms=deq_ms, append_ms=app, append_tokens=app_tokens, bytes=cbytes,
                        bits_per_elem=cbytes * 8 / (2 * b * h * t * d), gbs=cbytes / ours / 1e6,
                        frac_copy_bw=cbytes / ours / 1e6 / bw_copy, speedup_sdpa=sdpa_ms / ours,
                        speedup_deq=deq_ms / ours, block=[bn, nw])
                    del cache
                results.append(row)
                print(f"{model} B={b} T={t}: sdpa {sdpa_ms * 1e3:.0f} us; " + "; ".join(
                    f"{n} {m['ms'] * 1e3:.0f} us ({m['speedup_sdpa']:.2f}x)" for n, m in row["methods"].items()),
                    flush=True)
                del kbuf, vbuf
                torch.cuda.empty_cache()
    return results


def table(results, bw_copy) -> str:
    names = list(METHODS)
    head = "| model | B | context | fp16 SDPA us | " + " | ".join(
        f"{n} us (x SDPA, x deq+SDPA, % copy BW)" for n in names) + " | append 1 token, kvquant us |"
    lines = [head, "|" + "---|" * (5 + len(names))]
    for r in results:
        cells = []
        for n in names:
            if n not in r["methods"]:
                cells.append("n/a")
                continue
            m = r["methods"][n]
            cells.append(f"{m['ms'] * 1e3:.0f} ({m['speedup_sdpa']:.2f}x, {m['speedup_deq']:.2f}x, "
                         f"{100 * m['frac_copy_bw']:.0f}%)")
        kvq = next((n for n in names if n.startswith("kvquant") and n in r["methods"]), None)
        app = r["methods"][kvq]["append_ms"] * 1e3 if kvq else float("nan")
        lines.append(f"| {r['model']} | {r['batch']} | {r['context'] // 1024}K | {r['sdpa_ms'] * 1e3:.0f} | "
                     + " | ".join(cells) + f" | {app:.1f} |")
    lines.append(f"\ncopy bandwidth (read+write): {bw_copy:.0f} GB/s")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON results path")
    ap.add_argument("--tune", action="store_true", help="pick block_n/num_warps at 128K first")
    ap.add_argument("--quick", action="store_true", help="fewer contexts")
    ap.add_argument("--contexts", default="", help="comma-separated token counts (overrides defaults)")
    ap.add_argument("--methods", default="", help="comma-separated subset of: " + ", ".join(METHODS))
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of: " + ", ".join(MODELS))
    args = ap.parse_args()
    for name in [m for m in args.methods.split(",") if m]:
        if name not in METHODS:
            raise SystemExit(f"unknown method {name}")
    if args.methods:
        for name in set(METHODS) - set(args.methods.split(",")):
            del METHODS[name]
    for name in set(MODELS) - set(args.models.split(",")):
        del MODELS[name]
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    t_start = time.time()
    torch.manual_seed(0)
    name = torch.cuda.get_device_name()
    print(f"# {name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    notes = correctness()
    print("\n".join(notes), flush=True)
    bw = copy_bandwidth()
    print(f"copy bandwidth {bw:.0f} GB/s", flush=True)
    best = tune([(16, 4), (32, 4), (32, 8), (64, 8)]) if args.tune else {}
    if args.contexts:
        contexts = [int(x) for x in args.contexts.split(",")]
    elif args.quick:
        contexts = [4096, 131072]
    else:
        contexts = [4096, 32768, 131072, 1048576]
    results = run(contexts, [int(x) for x in args.batches.split(",")], best, bw)
    md = table(results, bw)
    print(md)
    with open(args.out, "w") as f:
        json.dump(dict(gpu=name, torch=torch.__version__, triton=triton.__version__, copy_gbs=bw, notes=notes,
                       tuned={f"{k[0]}|G={k[1]}": v for k, v in best.items()}, results=results, table=md,
                       seconds=time.time() - t_start), f, indent=1)


if __name__ == "__main__":
    main()
