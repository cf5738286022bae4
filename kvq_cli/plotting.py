"""PNG of estimated memory against context (``kvq estimate-memory --plot``); matplotlib is imported lazily."""

from __future__ import annotations

from pathlib import Path

from .errors import KvqError

GiB = 1 << 30


def memory_plot(path: str | Path, curves: dict[str, tuple[list[int], list[float]]], budget: float, title: str,
                context: int | None = None, max_contexts: dict[str, int] | None = None) -> Path:
    """Memory (GiB) against context (log x) per configuration, the budget as a horizontal line, and where the
    table's ``max ctx`` of each configuration meets it (``max_contexts``: name -> tokens)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise KvqError("--plot needs matplotlib: pip install 'kvq[plot]' (or pip install matplotlib)") from None
    fig = Figure(figsize=(8, 5), dpi=120)
    FigureCanvasAgg(fig)  # the Agg backend, without touching pyplot's global state
    ax = fig.add_subplot()
    for name, (xs, ys) in curves.items():
        line, = ax.plot(xs, [y / GiB for y in ys], label=name, linewidth=2 if name == "fp16" else 1.5)
        if max_contexts and max_contexts.get(name):
            ax.plot([max_contexts[name]], [budget / GiB], marker="o", color=line.get_color(), markersize=4)
    ax.axhline(budget / GiB, color="black", linestyle="--", linewidth=1, label=f"budget {budget / GiB:.1f} GiB")
    if context:
        ax.axvline(context, color="grey", linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("KV + weights + allowance (GiB)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    try:
        fig.savefig(out, format="png")
    except OSError as exc:
        raise KvqError(f"cannot write --plot {out}: {exc.strerror or exc}") from None
    return out
