"""One GQA decode call of a Gluon program for Nsight Compute (not a test): a random int2, nf4, kivi2, kvq2 or kvq2-1%
cache at Llama-3-8B's heads (8 KV heads, 4 query heads each, D = 128), counts on the device as ``kvq generate``'s
graphs read them, called four times so that ncu can skip the compiling launches.

    ncu --kernel-name regex:int_mma --launch-skip 2 --launch-count 1 --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section SchedulerStats --section LaunchStats --section MemoryWorkloadAnalysis \\
        python bench/ncu_mma.py int2 131072
    (kivi2: --kernel-name regex:kivi_mma; kvq2 and kvq2-1%, KVQuant 2-bit without and with 1% outliers:
    regex:kvq_mma, and regex:outlier for the outliers' two passes; nf4: regex:nf_mma; pq and cq, the caches of
    ``bench_pq_mma.py``: regex:pq_mma, regex:cq_mma)
    Per-instruction stall samples: ``--section SourceCounters --page source --csv --print-source sass``, summed by
    opcode with ``bench/ncu_stalls.py``.

Results: ``docs/results/kernels-decode-attention.md`` (session 12, ``raw/session12-ncu-*-mma.txt``).
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import kvq_kernels.decode_attention as da  # noqa: E402
import kvq_kernels.decode_token as dtk  # noqa: E402
from bench_decode_attention import METHODS, random_kivi, random_kvquant, random_token  # noqa: E402


def main(method: str = "int2", tokens: int = 131072, batch: int = 1) -> None:
    if method in ("pq", "cq"):
        from bench_pq_mma import METHODS as VQ

        make, fn = VQ[method][:2]
        cache, q = make(batch, tokens, False), torch.randn(batch, 32, 128, device="cuda").half()
        for _ in range(4):
            fn(q, cache)
        torch.cuda.synchronize()
        return
    if method == "kivi2":
        cache, fn = random_kivi(batch, 8, 128, tokens, cfg=METHODS["kivi-2b"]), da.decode_attention_kivi
    elif method in ("kvq2", "kvq2-1%"):
        cfg = "kvquant-2b-0%" if method == "kvq2" else "kvquant-2b-1%-rows"
        cache = random_kvquant(batch, 8, 128, tokens, cfg=METHODS[cfg])
        fn = da.decode_attention_kvquant
        for rows in (cache.k_sparse, cache.v_sparse):
            if rows is not None:
                rows.cover(cache.k_packed.shape[2])  # device counts read pointers over the capacity
    else:
        cache, fn = random_token(batch, 8, 128, tokens, cfg=METHODS[method]), dtk.decode_attention_token
    q = torch.randn(batch, 32, 128, device="cuda").half()
    lens = torch.tensor([cache.n_packed, cache.n_res, 0, 0], dtype=torch.int64, device="cuda")
    for _ in range(4):
        fn(q, cache, lens=lens)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "int2", *(int(x) for x in sys.argv[2:4]))
