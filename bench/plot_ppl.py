"""Perplexity against average bits for every configuration of a results JSON (``bench/ppl_results.py``).

    python bench/plot_ppl.py docs/results/ppl-smollm2.json docs/results/ppl-smollm2.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def family(name: str) -> str:
    return name.split("-")[0]


def main(src: str, dst: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = json.loads(Path(src).read_text())["results"]["main"]
    rows = res["results"]
    base = rows[0]["perplexity"]
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for fam in sorted({family(r["name"]) for r in rows[1:]}):
        pts = sorted((r["avg_bits"], r["perplexity"], r["name"]) for r in rows[1:] if family(r["name"]) == fam)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if fam != "kvquant" else "s-", label=fam)
        for x, y, name in pts:
            ax.annotate(name.removeprefix(fam + "-"), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(base, color="k", lw=0.8, ls="--", label=f"fp16 baseline {base:.2f}")
    ax.set_yscale("log")
    ax.set_xlabel("average bits per K/V element (everything the cache holds)")
    ax.set_ylabel("WikiText-2 perplexity (log)")
    ax.set_title(f"{res['model']}: {res['windows']} x {res['seqlen']} tokens, {res['mode']}, {res['device']}",
                 fontsize=9)
    ax.set_ylim(base * 0.97, min(max(r["perplexity"] for r in rows) * 1.2, base * 40))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst)


if __name__ == "__main__":
    main(*sys.argv[1:3])
