"""The int Gluon program with its value product transposed (``decode_mma.SWAP_PV``) and plain, on a GPU (not a test):
int2 and int4 at 128K and 1M (batch 1) and 128K (batch 8), counts on the device, fp16 SDPA in the same run, each
checked against the reference first.

    python bench/bench_swap_pv.py swap.json

Results: ``docs/results/kernels-decode-attention.md`` (session 12).
"""
import functools
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(__file__))
import kvq_kernels.decode_token as dtk  # noqa: E402
from bench_mma import METHODS, D, G, H, graph_ms, random_token  # noqa: E402
from kvq_kernels import decode_mma as mma  # noqa: E402
from kvq_kernels.token_reference import decode_attention_token_ref  # noqa: E402


def main(out: str) -> None:
    rows = []
    for name in ("int2", "int4"):
        small = random_token(2, 3, D, 1000, cfg=METHODS[name])
        q = torch.randn(2, 12, D, device="cuda").half()
        want = decode_attention_token_ref(q.float(), small)
        for sw in (True, False):
            mma.SWAP_PV = sw
            got = dtk.decode_attention_token(q, small).float()
            print(name, "swap", sw, "rel err", ((got - want).norm() / want.norm()).item(), flush=True)
        for t, b in ((131072, 1), (1048576, 1), (131072, 8)):
            c = random_token(b, H, D, t, cfg=METHODS[name])
            q = torch.randn(b, H * G, D, device="cuda").half()
            kb = torch.randn(b, H, t, D, device="cuda", dtype=torch.float16)
            vb = torch.randn_like(kb)
            sdpa = graph_ms(functools.partial(F.scaled_dot_product_attention, q[:, :, None], kb, vb, enable_gqa=True))
            del kb, vb
            lens = torch.tensor([c.n_packed, c.n_res, 0, 0], dtype=torch.int64, device="cuda")
            r = dict(method=name, context=t, batch=b, sdpa_us=sdpa * 1e3)
            for sw in (True, False):
                mma.SWAP_PV = sw
                ms = graph_ms(functools.partial(dtk.decode_attention_token, q, c, lens=lens))
                r[f"swap{int(sw)}_us"] = ms * 1e3
                r[f"swap{int(sw)}_regs"] = mma.COMPILED.get("int")
            print(json.dumps(r), f"swap {sdpa / r['swap1_us'] * 1e3:.2f}x  no swap {sdpa / r['swap0_us'] * 1e3:.2f}x",
                  flush=True)
            rows.append(r)
            del c
    mma.SWAP_PV = False
    with open(out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
