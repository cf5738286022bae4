"""Where kvquant's 1% outliers spend their time (not a test): one ``decode_attention_kvquant`` call at Llama-3-8B's
heads (8 KV heads, 4 query heads each, D = 128, batch 1) over a random ``kvquant-2b-1%-rows`` cache, with the outliers
of keys and values, keys only, values only and none (the same cache, ``dataclasses.replace``), then each outlier pass
alone and the zeroing of the key corrections. CUDA-graph replays with L2 flushed (``bench_mma.graph_ms``).

    python bench/probe_outliers.py [--tokens 131072]

Results: ``docs/results/kernels-decode-attention.md`` (sessions 13-14, ``raw/session1[34]-outlier-probe-h200.txt``).
"""
import argparse
import dataclasses
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import kvq_kernels.decode_attention as da  # noqa: E402
from bench_decode_attention import METHODS, random_kvquant  # noqa: E402
from bench_mma import graph_ms  # noqa: E402

H, G, D = 8, 4, 128


def main(t: int) -> None:
    c = random_kvquant(1, H, D, t, METHODS["kvquant-2b-1%-rows"])
    q = torch.randn(1, H * G, D, device="cuda", dtype=torch.float16)
    for name, cc in (("both", c), ("keys only", dataclasses.replace(c, v_sparse=None)),
                     ("values only", dataclasses.replace(c, k_sparse=None)),
                     ("none", dataclasses.replace(c, k_sparse=None, v_sparse=None))):
        us = graph_ms(functools.partial(da.decode_attention_kvquant, q, cc)) * 1e3
        print(f"{t} {name}: {us:.1f} us", flush=True)
    print("entries", c.k_sparse.counts().sum().item(), c.v_sparse.counts().sum().item(), "block", c.k_sparse.block)
    # each outlier pass alone, as the Gluon program's plan launches it (tiles of 64 tokens)
    ka, ksc = da.key_affine(c)
    invf = da._frequencies(c, q.device)
    tab = da.rope_block_table(invf, 32, t // 32 + 4)
    scale = D ** -0.5 * da.LOG2E
    keys = functools.partial(da._key_outliers, c, q, ka, ksc, invf, tab, 32, scale, None, c.n_packed)
    print("key outliers alone", graph_ms(keys) * 1e3, flush=True)
    nsp = 67
    ss = torch.zeros(1, H * G, c.n_packed, device="cuda")
    mp = torch.zeros(H * G, nsp, device="cuda")
    ap = torch.zeros(H * G, nsp, D, device="cuda")
    per = -(-c.n_packed // (nsp - 1) // 64) * 64
    values = functools.partial(da._value_outliers, c, q, ss, mp, ap, per, nsp, None, c.n_packed, 64)
    print("value outliers alone", graph_ms(values) * 1e3, flush=True)
    zero = functools.partial(torch.zeros, 1, H * G, c.n_packed, device="cuda")
    print("zero ds", graph_ms(zero) * 1e3, flush=True)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=131072)
    main(ap.parse_args().tokens)
