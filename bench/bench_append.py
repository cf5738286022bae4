"""Time the runtime's kvquant quantize-and-append on a GPU (not a test: run it by hand).

    python bench/bench_append.py --out append.json

For Llama-2-7B heads (32 KV heads x 128) and Llama-3-8B heads (8 x 128), batch 1 and 8, kvquant 2 and 4 bits
with 1% outliers, one new token per layer (keys and values), it times:
  * ``fused``: what the runtime does per decode step (``kvq_cli.runtime.fused``): two Triton launches and the
    host work around them (medians of ``triton.testing.do_bench``: the wall time per step when the host is
    the slower side);
  * ``kernels``: the two append kernels' own GPU time per step (``torch.profiler``, 50 steps);
  * ``queued``: wall time per step of 200 ``fused`` steps issued without a synchronize (the host side, plus
    the waits of the occasional capacity read-back of ``SparseRows.reserve``);
  * ``pytorch``: the previous runtime path (the method's encode, bit packing, ``SparseRows.append``).
Prints a markdown table; writes JSON to --out.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import torch
from triton.testing import do_bench

from kvq_cli.methods import make_method
from kvq_cli.runtime.fused import FusedAppend
from kvq_cli.runtime.storage import PackedStore

DEV = "cuda"
MODELS = {"llama2-7b": 32, "llama3-8b": 8}  # KV heads (D = 128)
EDGE = 2.576  # N(0, 1) entries beyond it: 1%


def setup(b, h, bits, d=128):
    m = make_method("kvquant", bits=bits, outliers=0.01)
    cb = torch.sort(torch.rand(1 << bits, device=DEV) * 2 - 1).values.half().float()
    state = dict(key_codebook=cb, value_codebook=cb, key_lo=torch.full((h, d), -EDGE, device=DEV),
                 key_hi=torch.full((h, d), EDGE, device=DEV))
    pairs = [(PackedStore(m, key, 1, None), FusedAppend(m, key)) for key in (True, False)]
    x = torch.randn(b, h, 1, d, device=DEV, dtype=torch.bfloat16)
    for _ in range(64):  # one pointer block of tokens
        fused_step(pairs, x, state)
    return m, state, pairs, x


def fused_step(pairs, x, state):
    for store, write in pairs:
        write(store, x, state)


def kernels_only(pairs, x, state, steps=50) -> float:
    """GPU ms per step of the two append kernels (``torch.profiler``: their device time over ``steps`` steps)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fused_step(pairs, x, state)
        torch.cuda.synchronize()
    us = sum(e.self_device_time_total for e in prof.key_averages() if "_append_kernel" in e.key)
    return us / 1e3 / steps


def host_ms(pairs, x, state, steps=200) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fused_step(pairs, x, state)
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) * 1e3 / steps


def pytorch_step(m, state, x):
    stores = [PackedStore(m, key, 1, None) for key in (True, False)]

    def step():
        for store, enc in zip(stores, (m.encode_keys, m.encode_values), strict=True):
            store.append(enc(x, state))

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows = []
    for model, h in MODELS.items():
        for b in (1, 8):
            for bits in (2, 4):
                m, state, pairs, x = setup(b, h, bits)
                fused = do_bench(functools.partial(fused_step, pairs, x, state), warmup=25, rep=100,
                                 return_mode="median")
                kern = kernels_only(pairs, x, state)
                host = host_ms(pairs, x, state)
                torch_ms = do_bench(pytorch_step(m, state, x), warmup=25, rep=100, return_mode="median")
                rows.append(dict(model=model, batch=b, bits=bits, fused_us=fused * 1e3, kernels_us=kern * 1e3,
                                 queued_us=host * 1e3, pytorch_us=torch_ms * 1e3))
                print(rows[-1], flush=True)
    lines = ["| model | B | bits | fused (runtime) us | kernels (GPU) us | queued us | previous PyTorch path us |",
             "|---|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['batch']} | {r['bits']} | {r['fused_us']:.1f} | {r['kernels_us']:.1f} | "
              f"{r['queued_us']:.1f} | {r['pytorch_us']:.0f} |" for r in rows]
    print("\n".join(lines))
    out = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, results=rows, table="\n".join(lines))
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
