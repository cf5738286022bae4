"""What the kvquant decode kernel spends its time on, by ablation (timing only: ablated outputs are wrong; not a
test, run it by hand on a GPU).

    python bench/probe_kvquant_ablations.py --out ablations.json

At 128K tokens, batch 1, fp16 queries, for Llama-2-7B heads (MHA, CUDA-core programs) and Llama-3-8B heads
(GQA, ``tl.dot`` programs), kvquant 2-bit with per-row sparse outliers (1% of key and of value entries):
  * full: the kernel as shipped (and with other entry chunks / warps for the outlier kernels);
  * no outliers: the same cache without its sparse rows (no correction kernels, no score buffers);
  * no RoPE / no lookup: ``decode_attention.ABLATE`` 1 / 2 on the cache without outliers;
  * kivi-2b: no RoPE, no codebook, one scale/zero per key group, for scale.
Medians of ``triton.testing.do_bench``, with fp16 SDPA on 16-bit K/V measured in the same run.
"""

from __future__ import annotations

import argparse
import functools
import json

import bench_decode_attention as bda
import kvq_kernels.decode_attention as da
import torch
import torch.nn.functional as F

T = 131072


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    rows, default = [], (da.OUTLIER_CHUNK, da.OUTLIER_WARPS)
    for model, (h, g, d) in bda.MODELS.items():
        q = torch.randn(1, h * g, d, device="cuda", dtype=torch.float16)
        kbuf = torch.randn(1, h, T, d, device="cuda", dtype=torch.float16)
        vbuf = torch.randn_like(kbuf)
        sdpa = min(bda.bench(functools.partial(F.scaled_dot_product_attention, q.view(1, h, g, d), kbuf, vbuf)),
                   bda.bench(functools.partial(F.scaled_dot_product_attention, q.view(1, h * g, 1, d), kbuf, vbuf,
                                               enable_gqa=g > 1)))
        del kbuf, vbuf
        full = bda.random_kvquant(1, h, d, T, bda.METHODS["kvquant-2b-1%-rows"])
        plain = bda.random_kvquant(1, h, d, T, dict(bda.METHODS["kvquant-2b-1%-rows"], rows=0))
        kivi = bda.random_kivi(1, h, d, T, bda.METHODS["kivi-2b"])
        times = {}
        for chunk, warps in ((32, 4), (32, 1), (64, 2), (128, 4), (64, 1)):  # the outlier kernels' shape
            da.OUTLIER_CHUNK, da.OUTLIER_WARPS = chunk, warps
            run = functools.partial(da.decode_attention_kvquant, q, full)
            times[f"full, outliers {chunk}/{warps}"] = bda.bench(run)
        da.OUTLIER_CHUNK, da.OUTLIER_WARPS = default
        times |= {"full": bda.bench(functools.partial(da.decode_attention_kvquant, q, full)),
                 "no outliers": bda.bench(functools.partial(da.decode_attention_kvquant, q, plain))}
        for flag, name in ((1, "no outliers, no RoPE"), (2, "no outliers, no lookup")):
            da.ABLATE = flag
            times[name] = bda.bench(functools.partial(da.decode_attention_kvquant, q, plain))
        da.ABLATE = 0
        times["kivi-2b"] = bda.bench(functools.partial(da.decode_attention_kivi, q, kivi))
        rows.append(dict(model=model, sdpa_us=sdpa * 1e3, **{k: v * 1e3 for k, v in times.items()}))
        print(rows[-1], flush=True)
        del full, plain, kivi
        torch.cuda.empty_cache()
    with open(args.out, "w") as fh:
        json.dump(dict(gpu=torch.cuda.get_device_name(), context=T, batch=1, rows=rows), fh, indent=1)


if __name__ == "__main__":
    main()
