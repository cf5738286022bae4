"""GQA decode programs (``tl.dot``) at each dot precision: time at 128K and error against the reference (not a
test; run it by hand on a GPU).

    python bench/probe_dot_precision.py --out dot-precision.json

For Llama-3-8B heads (8 KV heads, G = 4, D = 128), batch 1: kvquant-2b-1% with per-row sparse outliers and
kivi-2b, with ``decode_attention.DOT_PRECISION_16`` (fp16 queries) set to ``tf32x3`` (the float32 default),
``tf32`` (the 16-bit default since this probe) and ``ieee``: medians of ``do_bench`` at 128K, and the relative
error of the output against the PyTorch reference on a 4096-token cache with fp16 queries.
"""

from __future__ import annotations

import argparse
import functools
import json

import bench_decode_attention as bda
import kvq_kernels.decode_attention as da
import torch
from kvq_kernels import reference as ref

PRECISIONS = ("tf32x3", "tf32", "ieee")  # session 5 ran this with tf32x3 as the default


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    h, g, d = bda.MODELS["llama3-8b"]
    rows, default = [], da.DOT_PRECISION_16
    for name in ("kvquant-2b-1%-rows", "kivi-2b"):
        cfg = bda.METHODS[name]
        kv = cfg["kind"] == "kvquant"
        make = bda.random_kvquant if kv else bda.random_kivi
        fn = da.decode_attention_kvquant if kv else da.decode_attention_kivi
        want_fn = ref.decode_attention_kvquant_ref if kv else ref.decode_attention_kivi_ref
        small, big = make(1, h, d, 4096, cfg), make(1, h, d, 131072, cfg)
        q = torch.randn(1, h * g, d, device="cuda", dtype=torch.float16)
        want = want_fn(q, small).float()
        for prec in PRECISIONS:
            da.DOT_PRECISION_16 = prec
            got = fn(q, small).float()
            err = ((got - want).norm() / want.norm()).item()
            ms = bda.bench(functools.partial(fn, q, big))
            rows.append(dict(method=name, precision=prec, us_128k=ms * 1e3, rel_err_4k=err))
            print(rows[-1], flush=True)
        da.DOT_PRECISION_16 = default
    with open(args.out, "w") as fh:
        json.dump(dict(gpu=torch.cuda.get_device_name(), rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
