"""Sum an Nsight Compute source page (``--section SourceCounters --page source --csv --print-source sass``, one
kernel) by SASS opcode: warp stall samples by reason, executed instructions, shared-memory wavefronts against the
ideal, global sectors and their excess (not a test).

    python bench/ncu_stalls.py ncu-source.csv [--top 22]

Results: ``docs/results/kernels-decode-attention.md`` (session 16, ``raw/session16-ncu-*-stalls.txt``).
"""
from __future__ import annotations

import argparse
import collections
import csv
import gzip


def _rows(path: str) -> tuple[list[str], list[list[str]]]:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        rows = list(csv.reader(f))
    start = next(i for i, r in enumerate(rows) if r and r[0] == "Address")
    return rows[start], [r for r in rows[start + 1:] if len(r) >= len(rows[start])]


def _opcode(source: str) -> str:
    words = source.split()
    if words and words[0].startswith("@"):  # a predicate
        words = words[1:]
    return words[0].split(".")[0] if words else ""


def summary(path: str, top: int = 22) -> str:
    hdr, data = _rows(path)
    ix = {h: i for i, h in enumerate(hdr)}
    stalls = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]
    total, executed = collections.Counter(), collections.Counter()
    by_op = collections.defaultdict(collections.Counter)
    samples = 0
    for r in data:
        op = _opcode(r[ix["Source"]])
        samples += int(r[ix["Warp Stall Sampling (All Samples)"]])
        executed[op] += int(r[ix["Instructions Executed"]])
        for h in stalls:
            total[h] += int(r[ix[h]])
            by_op[op][h] += int(r[ix[h]])

    def col(name: str) -> int:
        return sum(int(r[ix[name]] or 0) for r in data)

    out = [f"samples {samples}"]
    out += [f"{h:25s} {v:8d} {100 * v / samples:5.1f}%" for h, v in total.most_common(10)]
    out.append("--- by opcode (samples, top stalls) | executed warp instructions")
    for op, c in sorted(by_op.items(), key=lambda x: -sum(x[1].values()))[:top]:
        v = sum(c.values())
        out.append(f"{op:8s} {v:7d} {100 * v / samples:5.1f}%  instr {executed[op]:9d}  " +
                   ", ".join(f"{h[6:]}:{n}" for h, n in c.most_common(3)))
    out.append(f"shared wavefronts {col('L1 Wavefronts Shared')} ideal {col('L1 Wavefronts Shared Ideal')}")
    out.append(f"global sectors {col('L2 Theoretical Sectors Global')} excessive "
               f"{col('L2 Theoretical Sectors Global Excessive')}")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=22)
    a = ap.parse_args()
    print(summary(a.csv, a.top))


if __name__ == "__main__":
    main()
