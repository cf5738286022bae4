"""Registers, spills and SASS instructions a token-loop iteration of the Gluon decode programs, compiled for sm_90 on
any machine (no GPU; not a test). The register count decides how many programs an SM holds (``decode_mma.resident``),
and it moves with small code changes, so check it here before spending device time.

    python bench/ptxas_registers.py [--json out.json] [--opcodes]

``--opcodes``: also each variant's loop by SASS opcode (always in the JSON). Besides the defaults it compiles the
2-bit value lookups of byte permutes (``decode_mma_kvquant.VALUE_NIBBLES`` off; on by default since session 15)
and one-warp programs (``decode_mma.WARPS = 1``, ``bench_mma.py --sweep``), and the pq and cq programs (cq also
without its prefetch, ``decode_mma_cq.PREFETCH``).

Uses the installed Triton's compiler and ``cuobjdump``: the numbers in ``docs/results/kernels-decode-attention.md``
(sessions 12-14) are Triton 3.6's, the GPU image's (``pip install triton==3.6.0`` in a separate environment); another
Triton version gives other counts.
"""
import argparse
import json

import triton
from kvq_kernels import decode_mma, decode_mma_cq, decode_mma_kivi, decode_mma_kvquant, decode_mma_nf, decode_mma_pq

VARIANTS = [(f"int{bits} G=4 {'device' if dyn else 'host'} counts{' transposed' if swap else ''}",
             lambda bits=bits, dyn=dyn, swap=swap: decode_mma.compiled_counts(4, dyn, bits, swap=swap, sass=True))
            for bits in (2, 4) for dyn in (False, True) for swap in (False, True)]
VARIANTS += [(f"kivi2 G=4 {'device' if dyn else 'host'} counts",
              lambda dyn=dyn: decode_mma_kivi.kivi_compiled_counts(4, dyn, sass=True)) for dyn in (False, True)]
VARIANTS += [(f"kvquant k{bk} v{bv} G=4 {'device' if dyn else 'host'} counts{' outliers' if sp else ''}",
              lambda bk=bk, bv=bv, dyn=dyn, sp=sp: decode_mma_kvquant.kvq_compiled_counts(4, dyn, bk, bv, sp, sp,
                                                                                           sass=True))
             for bk, bv in ((2, 2), (4, 4)) for dyn in (False, True) for sp in (False, True)]
VARIANTS += [(f"nf{bits} G=4 {'device' if dyn else 'host'} counts",
              lambda bits=bits, dyn=dyn: decode_mma_nf.nf_compiled_counts(4, dyn, bits, sass=True))
             for bits in (2, 4) for dyn in (False, True)]
VARIANTS += [("kvquant k2 v2 G=4 device counts byte lookups",
              lambda: decode_mma_kvquant.kvq_compiled_counts(4, True, 2, 2, sass=True, nib=False)),
             ("kvquant k2 v2 G=4 device counts outliers byte lookups",
              lambda: decode_mma_kvquant.kvq_compiled_counts(4, True, 2, 2, True, True, sass=True, nib=False)),
             ("nf2 G=4 device counts byte lookups",
              lambda: decode_mma_nf.nf_compiled_counts(4, True, 2, sass=True, nib=False)),
             ("int2 G=4 device counts one warp", lambda: decode_mma.compiled_counts(4, True, 2, warps=1, sass=True)),
             ("kvquant k2 v2 G=4 device counts one warp",
              lambda: decode_mma_kvquant.kvq_compiled_counts(4, True, 2, 2, warps=1, sass=True)),
             ("nf2 G=4 device counts one warp",
              lambda: decode_mma_nf.nf_compiled_counts(4, True, 2, warps=1, sass=True))]
# the shared-memory programs (8 warps, one program an SM): pq-d2x8b, cq-4c8b (with and without its prefetch)
VARIANTS += [(f"pq d2x8b G=4 {'device' if dyn else 'host'} counts",
              lambda dyn=dyn: decode_mma_pq.pq_compiled_counts(4, sass=True, dyn=dyn)) for dyn in (False, True)]
VARIANTS += [(f"cq 4c8b G=4 {'device' if dyn else 'host'} counts{'' if pf else ' no prefetch'}",
              lambda dyn=dyn, pf=pf: decode_mma_cq.cq_compiled_counts(4, sass=True, pf=pf, dyn=dyn))
             for dyn in (False, True) for pf in (True, False)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="")
    ap.add_argument("--opcodes", action="store_true")
    args = ap.parse_args()
    rows = []
    print(f"Triton {triton.__version__}, sm_90")
    for name, compile_it in VARIANTS:
        c = compile_it()
        warps = 1 if name.endswith("one warp") else decode_mma.WARPS
        programs = decode_mma.resident(c["registers"], warps)
        if name.startswith(("pq", "cq")):  # 8 warps; their codebooks' shared memory allows one an SM
            programs = min(decode_mma.resident(c["registers"], 8), max(1, decode_mma_pq.SMEM_PER_SM //
                                                                       (c["shared_bytes"] + 1024)))
        rows.append(dict(variant=name, registers=c["registers"], stack_bytes=c["stack_bytes"],
                         sass_loop=c["sass_loop"], mma_loop=c["loop"]["mma.sync"], loop_opcodes=c["loop_opcodes"]))
        print(f"{name:38s} {c['registers']:4d} registers, {c['stack_bytes']} stack bytes, loop {c['sass_loop']} "
              f"SASS ({c['loop']['mma.sync']} mma.sync), {programs} programs an SM", flush=True)
        if args.opcodes:
            print("    " + ", ".join(f"{op} {n}" for op, n in c["loop_opcodes"].items()), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
