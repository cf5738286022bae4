"""Time CQ and PQ (MILLION) decode attention on a GPU against fp16 SDPA in the same run (not a test).

    python bench/bench_cq_pq_decode.py [--contexts 4096,32768,131072] [--tune] [--out results.json]

One decode step of one layer, batch 1, for Llama-2-7B heads (32 KV heads x 128, MHA) and Llama-3-8B heads
(32 query / 8 KV heads, D = 128):
  * fp16 SDPA: ``torch.nn.functional.scaled_dot_product_attention`` on fp16 K/V of the full context (the G
    query heads of a KV head passed as G query rows, so GQA needs no repeat; with G > 1 also
    ``enable_gqa=True``, which is much faster at batch 1: ``sdpa_gqa_ms``; the faster of the two is the baseline
    of ``ratio``, as in ``bench_decode_attention``: before session 9 the ratio used the rows layout alone, which
    flattered GQA ten-fold);
  * cq-4c8b, cq-8c8b (1 fp16 sink token, pre-RoPE keys rotated in the kernel) and pq-d2x8b (MILLION's
    default here: M = D/2 subspaces of 2 dims, 8-bit codes; 128 fp16 residual tokens), straight from the
    packed codes (``kvq_kernels.cq_decode`` / ``pq_decode``), fp16 codebooks as the runtime stores them.
Codes are random (timing does not depend on their values). Medians of ``triton.testing.do_bench``. With
``--tune`` each kernel is also timed at BLOCK_N 16/32/64 on the largest context and the best is reported.
Prints a markdown table; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import torch.nn.functional as F
from kvq_kernels.cq_decode import decode_attention_cq
from kvq_kernels.pq_decode import decode_attention_pq
from kvq_kernels.vq_reference import decode_attention_cq_ref, decode_attention_pq_ref, empty_vq_cache
from triton.testing import do_bench

MODELS = {"llama2-7b": (32, 1, 128), "llama3-8b": (8, 4, 128)}  # KV heads, G, D
METHODS = {
    "cq-4c8b": dict(kind="cq", channels=4, bits=8, sink=1, res=0),
    "cq-8c8b": dict(kind="cq", channels=8, bits=8, sink=1, res=0),
    "pq-d2x8b": dict(kind="pq", subspaces=64, bits=8, sink=0, res=128),
}
DEV = "cuda"


def bench(fn) -> float:
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def random_cache(h: int, d: int, t: int, cfg: dict):
    """A packed cache of ``t`` tokens (sink + packed + residual) with random codes and codebooks."""
    k = 1 << cfg["bits"]
    if cfg["kind"] == "cq":
        shape = (h, d // cfg["channels"], k, cfg["channels"])
        extra = dict(pre_rope=True, rope_theta=500000.0)
    else:
        shape = (cfg["subspaces"], k, d // cfg["subspaces"])
        extra = {}
    ck, cv = (torch.randn(*shape, device=DEV).half() for _ in range(2))
    n_packed = t - cfg["sink"] - cfg["res"]
    c = empty_vq_cache(cfg["kind"], 1, h, n_packed, cfg["bits"], ck, cv, n_sink=cfg["sink"], max_res=cfg["res"],
                       **extra)
    for x in (c.k_codes, c.v_codes):
        x.random_(0, 256)
    for x in (c.sink_k, c.sink_v, c.res_k, c.res_v):
        x.normal_()
    c.n_packed, c.n_res = n_packed, cfg["res"]
    return c


def time_ours(q, cache, fn, block_ns: list[int | None]) -> dict:
    return {bn: bench(lambda bn=bn: fn(q, cache, block_n=bn)) for bn in block_ns}


def time_sdpa(q, h: int, g: int, t: int, d: int) -> tuple[float, float | None]:
    """fp16 SDPA with the G query heads as G rows (as ``bench_decode_attention``), and with ``enable_gqa``."""
    kv = torch.randn(2, 1, h, t, d, device=DEV, dtype=torch.float16)
    qs = q.reshape(1, h, g, d)
    rows = bench(lambda: F.scaled_dot_product_attention(qs, kv[0], kv[1]))
    if g == 1:
        return rows, None
    return rows, bench(lambda: F.scaled_dot_product_attention(q[:, :, None], kv[0], kv[1], enable_gqa=True))


def run_one(model: str, method: str, t: int, block_ns: list[int | None]) -> dict:
    h, g, d = MODELS[model]
    cfg = METHODS[method]
    cache = random_cache(h, d, t, cfg)
    q = torch.randn(1, h * g, d, device=DEV, dtype=torch.float16)
    times = time_ours(q, cache, decode_attention_cq if cfg["kind"] == "cq" else decode_attention_pq, block_ns)
    best = min(times, key=times.get)
    code_bytes = 2 * cache.k_codes[:, :, : cache.n_packed].numel()
    cache = None
    torch.cuda.empty_cache()
    sdpa, sdpa_gqa = time_sdpa(q, h, g, t, d)
    torch.cuda.empty_cache()
    base = min(sdpa, sdpa_gqa or sdpa)  # the stronger of the two layouts is the baseline (as bench_decode_attention)
    return dict(model=model, method=method, context=t, ms=times[best], block_n=best, sdpa_ms=sdpa,
                ratio=times[best] / base, sdpa_base_ms=base, sdpa_gqa_ms=sdpa_gqa, code_bytes=code_bytes,
                fp16_bytes=2 * h * t * d * 2,
                all_block_n={str(k): v for k, v in times.items()})


def check(model: str, method: str) -> float:
    """Relative error of the kernel against the PyTorch reference at 4K tokens (a sanity check of the build)."""
    h, g, d = MODELS[model]
    cfg = METHODS[method]
    cache = random_cache(h, d, 4096, cfg)
    q = torch.randn(1, h * g, d, device=DEV)
    fn, ref = (decode_attention_cq, decode_attention_cq_ref) if cfg["kind"] == "cq" else (
        decode_attention_pq, decode_attention_pq_ref)
    want = ref(q, cache)
    return ((fn(q, cache) - want).norm() / want.norm()).item()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="4096,32768,131072")
    ap.add_argument("--tune", action="store_true", help="also try BLOCK_N 16/32/64 on the largest context")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    contexts = [int(x) for x in args.contexts.split(",")]
    gpu = torch.cuda.get_device_name()
    print(f"GPU: {gpu}; torch {torch.__version__}", flush=True)
    rows, chosen = [], {}
    for model in MODELS:
        for method in METHODS:
            err = check(model, method)
            print(f"check {model} {method}: rel err vs reference {err:.2e}", flush=True)
            if args.tune:
                r = run_one(model, method, contexts[-1], [16, 32, 64])
                chosen[(model, method)] = r["block_n"]
                print(f"tune {model} {method} @ {contexts[-1]}: {r['all_block_n']}", flush=True)
            for t in contexts:
                rows.append(run_one(model, method, t, [chosen.get((model, method))]) | {"check_rel_err": err})
                r = rows[-1]
                print(f"{model} {method} {t}: {r['ms']:.4f} ms vs sdpa {r['sdpa_ms']:.4f} ms", flush=True)
    print("\n| heads | method | context | ours (ms) | fp16 SDPA (ms, the faster layout) | ours / SDPA | BLOCK_N |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['context'] // 1024}K | {r['ms']:.3f} | {r['sdpa_base_ms']:.3f} | "
              f"{r['ratio']:.2f} | {r['block_n'] or 'default'} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": gpu, "torch": torch.__version__, "argv": sys.argv, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
