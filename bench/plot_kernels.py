"""The GQA decode programs against fp16 SDPA on the H200, one bar per method at 128K and 1M, with the kernel issue's
targets (not a test): read from the raw bench files in ``docs/results/raw`` (each method's newest measurement, the
session and file named under its bar), written as a PNG.

    python bench/plot_kernels.py docs/results/kernels-h200.png

Every number is a same-run ratio against fp16 SDPA (``enable_gqa=True``), Llama-3-8B heads, batch 1, CUDA-graph
replays with L2 flushed (``bench_mma.py``, ``bench_pq_mma.py``). Results: ``docs/results/kernels-decode-attention.md``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RAW = Path(__file__).resolve().parent.parent / "docs" / "results" / "raw"

#: label -> (raw file, method name in it (None: the file's method), session, issue target x SDPA or None)
SOURCES = {
    "int2": ("session12-mma-h200.json", "int2", 12, None),
    "int4": ("session12-mma-h200.json", "int4", 12, None),
    "nf2": ("session17-nf-prefetch-h200.json", "nf2", 17, None),
    "nf4": ("session14-bench-mma-nf-kvq.json", "nf4", 14, None),
    "kivi-2b": ("session17-kivi-ab-new-h200.json", "kivi2", 17, 3.0),
    "kvquant-2b-1%": ("session15-bench-mma-nib.json", "kvq2-1%-nib", 15, 3.0),
    "kvquant-4b-1%": ("session14-bench-mma-kvq-final.json", "kvq4", 14, 2.0),
    "pq-d2x8b": ("session15-bench-pq-mma-final.json", None, 15, 1.5),
    "cq-4c8b": ("session17-final-cq-bench-h200.json", None, 17, 1.5),
}
CONTEXTS = (131072, 1048576)


def ratios() -> dict[str, dict[int, float]]:
    """label -> {context: x SDPA} at batch 1 (the tensor-core program, counts on the host)."""
    out = {}
    for label, (name, method, _, _) in SOURCES.items():
        rows = json.loads((RAW / name).read_text())["rows"]
        out[label] = {r["context"]: r["x_sdpa"] for r in rows
                      if r["batch"] == 1 and r.get("method") in (method, None) and r["context"] in CONTEXTS
                      and r.get("warps", 8) == 8}
    return out


def main(dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = ratios()
    labels = list(SOURCES)
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=120)
    width = 0.38
    for i, ctx in enumerate(CONTEXTS):
        xs = [j + (i - 0.5) * width for j in range(len(labels))]
        name = f"{ctx >> 20}M" if ctx >= 1 << 20 else f"{ctx >> 10}K"
        ax.bar(xs, [data[lb].get(ctx, 0.0) for lb in labels], width, label=f"{name} tokens")
    for j, lb in enumerate(labels):
        target = SOURCES[lb][3]
        if target:
            ax.hlines(target, j - 0.45, j + 0.45, colors="black", linestyles="dashed",
                      label="target" if j == labels.index("kivi-2b") else None)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([f"{lb.replace('-', chr(10), 1)}\nsession {SOURCES[lb][2]}" for lb in labels], fontsize=8)
    ax.set_ylabel("speed vs fp16 SDPA (same run)")
    ax.set_title("GQA decode attention on one H200 (Llama-3-8B heads, batch 1)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/results/kernels-h200.png")
