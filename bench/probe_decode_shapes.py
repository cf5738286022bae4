"""Decode kernels against their PyTorch references over many shapes on a GPU (not a test: run it by hand).

    python bench/probe_decode_shapes.py [kinds] [head_dims] [groups] [block_ns]
    python bench/probe_decode_shapes.py kvquant,kivi 64,128 2,3,4,7 32     # the join-tree shapes kept

For every (kind, D, bits 1-4, G query heads per KV head, block_n) it fills a small random cache (the test
suite's helpers: B=2, 2 KV heads, ~200 tokens, sink and residual), runs ``decode_attention_*`` and prints the
relative error against ``kvq_kernels.reference`` with ``ok`` / ``BAD`` (tolerance: the tests' ``ATTN_RTOL``),
one line per case as it goes, then the count of bad cases. Used for the GQA mis-compile in
``docs/results/kernels-decode-attention.md``.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_kernels as T  # noqa: E402  (the test suite's cache builders)
from kvq_kernels import reference as ref  # noqa: E402
from kvq_kernels.decode_attention import decode_attention_kivi, decode_attention_kvquant  # noqa: E402


def _ints(i: int, default: str) -> list[int]:
    return [int(x) for x in (sys.argv[i] if len(sys.argv) > i else default).split(",")]


def main() -> None:
    kinds = (sys.argv[1] if len(sys.argv) > 1 else "kvquant,kivi").split(",")
    bad = []
    for kind, d, bits, g, bn in itertools.product(kinds, _ints(2, "64,128"), (1, 2, 3, 4), _ints(3, "2,3,4,7"),
                                                  _ints(4, "32")):
        gen = T._gen(7 + d + bits + g)
        try:
            if kind == "kvquant":
                c = T._kvquant_cache(gen, d, bits, bits, t=200, n_sink=3, n_res=7, tmax=256)
                q = T._randn(gen, T.B, T.H * g, d)
                got = decode_attention_kvquant(q, c, num_splits=3, block_n=bn)
                want = ref.decode_attention_kvquant_ref(q, c)
                err = T._rel(got, want)
            else:
                c = T._kivi_cache(gen, d, bits, t=192, n_sink=1, n_res=5, tmax=256)
                q = T._randn(gen, T.B, T.H * g, d)
                got, want = decode_attention_kivi(q, c, num_splits=3, block_n=bn), ref.decode_attention_kivi_ref(q, c)
                err = T._rel(got, want)
        except Exception as e:  # noqa: BLE001 - a shape the kernel refuses is reported, not fatal
            bad.append((kind, d, bits, g, bn, type(e).__name__))
            print(*bad[-1], "BAD", flush=True)
            continue
        ok = float(err) <= T.ATTN_RTOL
        if not ok:
            bad.append((kind, d, bits, g, bn, float(err)))
        print(kind, d, bits, g, bn, f"{float(err):.2e}", "ok" if ok else "BAD", flush=True)
    print("bad cases:", len(bad))


if __name__ == "__main__":
    main()
