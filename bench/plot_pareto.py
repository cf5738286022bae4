"""Pareto plot: perplexity increase against average bits for every method of several results JSONs.

    python bench/plot_pareto.py docs/results/pareto-smollm2.png docs/results/ppl-smollm2.json:main \
        docs/results/ppl-smollm2-cq.json:cq

Each ``FILE:PART`` is a table of ``bench/ppl_results.py``; every point is its perplexity increase over the
fp16 baseline *of its own run* (tables may use different numbers of windows). Filled markers: the average
bits at the evaluated length, everything the cache holds (codebooks included). Hollow markers, for methods
with large per-layer codebooks (cq, pq): the bits per element once the codebooks are amortized over a long
context (codes, scales and outliers only, from ``bits_per_token``). ``--targets 2.5=15,3.0=4`` marks issue
targets (at most B bits within +P%); ``--title`` sets the first title line (the machine).

    python bench/plot_pareto.py docs/results/pareto-smollm2-fidelity.png \
        docs/results/ppl-smollm2-fidelity.json:fidelity --targets 2.5=15,3.0=4,4.0=1 \
        --title "SmolLM2-135M, WikiText-2, simulated, H200"
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from kvq_cli.methods import parse_spec
from kvq_cli.presets import MODEL_PRESETS

#: method specs whose labels the tables use (to recover the configuration of a row)
SPECS = ["cq:channels=2,bits=8", "cq:channels=4,bits=8", "cq:channels=8,bits=8", "cq:channels=8,bits=10",
         "cq:channels=8,bits=8,outliers=0.01", "pq:bits=8", "pq:bits=8,subspaces=16",
         "cq:channels=8,bits=8,pre_rope=false", "pq:bits=8,sink=1", "pq:bits=8,sink=1,head_codebooks=true",
         "pq:bits=8,sink=1,head_codebooks=true,outliers=0.01", "pq:bits=8,sink=1,outliers=0.01"]


def family(name: str) -> str:
    """A row's method family: the label's first word (``kvquant-rot`` and ``kvquant-mix`` are their own)."""
    for fam in ("kvquant-rot", "kvquant-mix"):
        if name.startswith(fam):
            return fam
    return name.split("-")[0]


def main(dst: str, *sources: str, targets: str = "", title: str = "SmolLM2-135M, WikiText-2, simulated, H100"
         ) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shape = MODEL_PRESETS["smollm2-135m"]
    amortized = {m.label: m.bits_per_token(shape.kv_heads, shape.head_dim) / (2 * shape.kv_heads * shape.head_dim)
                 for m in map(parse_spec, SPECS)}
    points: dict[str, list] = {}
    notes = []
    for src in sources:
        path, part = src.rsplit(":", 1)
        res = json.loads(Path(path).read_text())["results"][part]
        base = res["results"][0]["perplexity"]
        notes.append(f"{Path(path).name}:{part} {res['windows']} windows")
        for r in res["results"][1:]:
            fam = family(r["name"])
            points.setdefault(fam, []).append((r["avg_bits"], 100 * (r["perplexity"] / base - 1), r["name"]))
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for i, (fam, pts) in enumerate(sorted(points.items())):
        color = f"C{i}"
        pts = sorted(set(pts))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", color=color, label=fam)
        for x, y, name in pts:
            ax.annotate(name.removeprefix(fam + "-"), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if name in amortized:
                ax.plot([amortized[name]], [y], "o", mfc="none", color=color)
                ax.plot([amortized[name], x], [y, y], ":", color=color, lw=0.8)
    for t in filter(None, targets.split(",")):
        bits, pct = map(float, t.split("="))
        ax.plot([bits], [pct], "x", color="red", ms=9, mew=2)
        ax.annotate(f"target: <= {bits:g} bits, +{pct:g}%", (bits, pct), fontsize=7, color="red", xytext=(4, -10),
                    textcoords="offset points")
    ax.set_yscale("log")
    ax.set_xlabel("average bits per K/V element (filled: at 2048 tokens, all state; hollow: codebooks amortized)")
    ax.set_ylabel("perplexity increase over fp16, % (log)")
    ax.set_title(title + "\n" + "; ".join(notes), fontsize=8)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst)


if __name__ == "__main__":
    args, opts = [], {}
    argv = iter(sys.argv[1:])
    for a in argv:
        if a in ("--targets", "--title"):
            opts[a[2:]] = next(argv)
        else:
            args.append(a)
    main(*args, **opts)
