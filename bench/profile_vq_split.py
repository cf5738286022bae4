"""Kernel-by-kernel device time of one decode-attention call (not a test): pq-d2x8b (``decode_mma_pq``'s packed
splits, ``pq_decode``'s fp16-segment split, the merge), cq-4c8b (``decode_mma_cq``, ``cq_decode``) and nf2
(``decode_mma_nf``) at Llama-3-8B heads, 128K tokens, batch 1, from ``torch.profiler`` over 10 calls with L2 flushed
before each (the flush is the ``vectorized_elementwise_kernel`` row).

    python bench/profile_vq_split.py

Results: ``docs/results/kernels-decode-attention.md`` (session 15: the segment split took 28 µs, then 7).
"""
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))
from bench_decode_attention import METHODS, random_token  # noqa: E402
from bench_pq_mma import D, G, H, random_cq, random_pq  # noqa: E402
from kvq_kernels.cq_decode import decode_attention_cq  # noqa: E402
from kvq_kernels.decode_token import decode_attention_token  # noqa: E402
from kvq_kernels.pq_decode import decode_attention_pq  # noqa: E402


def main() -> None:
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    nf2 = dict(METHODS["nf4"], bits=2)
    for name, make, fn in (("pq", lambda: random_pq(1, 131072, False), decode_attention_pq),
                           ("cq", lambda: random_cq(1, 131072), decode_attention_cq),
                           ("nf2", lambda: random_token(1, H, D, 131072, nf2), decode_attention_token)):
        c = make()
        q = torch.randn(1, H * G, D, device="cuda", dtype=torch.float16)
        for _ in range(3):
            fn(q, c)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                flush.zero_()
                fn(q, c)
            torch.cuda.synchronize()
        print(name)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))


if __name__ == "__main__":
    main()
