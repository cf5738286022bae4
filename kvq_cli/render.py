"""Rich tables for the CLI (rendering only: every number comes from ``kvq_cli.api``). Strings from the user or
the model (names, paths, generated text) are escaped: never read as rich markup."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text


def results_table(title: str, rows: list[dict[str, Any]]) -> Table:
    table = Table(title=Text(title), title_justify="left")
    for col in ("configuration", "avg bits", "perplexity", "Δ ppl", "KL (nats)", "top-1"):
        table.add_column(col, justify="left" if col == "configuration" else "right")
    base = rows[0]["perplexity"]
    for r in rows:
        delta = (r["perplexity"] / base - 1) * 100
        table.add_row(
            r["name"],
            f"{r['avg_bits']:.2f}",
            f"{r['perplexity']:.4f}",
            "" if r is rows[0] else f"{delta:+.2f}%",
            f"{r['kl_divergence']:.5f}",
            f"{r['top1_agreement'] * 100:.2f}%",
        )
    return table


def gib(n: float) -> str:
    return f"{n / (1 << 30):,.2f} GiB"


def tokens(n: int) -> str:
    """``131072`` -> ``128K``, ``1048576`` -> ``1M``, ``134486`` -> ``131.3K`` (K = 1024, M = 1024^2)."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n // size:,}{unit}" if n % size == 0 else f"{n / size:,.{1 if unit == 'K' else 2}f}{unit}"
    return f"{n:,}"


def memory_table(result: dict[str, Any], weights_dtype: str, batch: int, gpus: int) -> Table:
    """The estimate-memory table (GiB), fp16 first."""
    where = result["gpu"] or "budget"
    where = f"{where} {gib(result['budget_bytes'] / result['gpus'])}" + (f" x {gpus}" if gpus > 1 else "")
    title = (
        f"{escape(result['model'])} ({result['params'] / 1e9:.2f}B params, {weights_dtype}): "
        f"{tokens(result['context'])} tokens x batch {batch} on {where}"
    )
    caption = (
        f"KV, weights, total in GiB; total = KV + weights + allowance (1 GiB CUDA context + activations of one "
        f"4K prefill chunk: {gib(result['allowance_bytes'])} for fp16); max ctx: the longest context that fits "
        "(computed, not measured)"
    )
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    cols = ("configuration", "avg bits", "KiB/tok", "KV", "weights", "total", "fits", "max ctx")
    for col in cols:
        table.add_column(col, justify="left" if col == "configuration" else "right", no_wrap=col == "configuration")
    g = 1 << 30
    for r in result["results"]:
        table.add_row(
            r["name"],
            f"{r['avg_bits']:.2f}",
            f"{r['kv_bytes_per_token'] / 1024:,.1f}",
            f"{r['kv_bytes'] / g:,.2f}",
            f"{r['weights_bytes'] / g:,.2f}",
            f"{r['total_bytes'] / g:,.2f}",
            "yes" if r["fits"] else "[red]no[/]",
            tokens(r["max_context"]),
        )
    return table


def placement_lines(result: dict[str, Any]) -> list[str]:
    """``estimate-memory --gpus N``: which layers go on which GPU, per configuration, in GiB."""
    g = 1 << 30
    lines = []
    for r in result["results"]:
        if "placement" not in r:
            continue
        parts = [f"GPU{p['gpu']} layers {p['layers'][0]}-{p['layers'][1]} {p['total_bytes'] / g:,.1f}"
                 + ("" if p["fits"] else " [red](over)[/]") for p in r["placement"] if p["layers"]]
        lines.append(f"{r['name']}: " + ", ".join(parts))
    return lines


def methods_table(methods: list[dict[str, Any]]) -> Table:
    """``kvq methods``: one row per registered method."""
    table = Table(title="KV-cache quantization methods (use with --method NAME:key=value,... or kvq calibrate)",
                  title_justify="left")
    for col in ("method", "bits", "calibrate", "options (defaults)", "what"):
        table.add_column(col)
    for m in methods:
        opts = ", ".join(f"{k}={v}" for k, v in m["options"].items())
        table.add_row(m["name"], "/".join(map(str, m["bits"])), "yes" if m["needs_calibration"] else "no", opts,
                      m["summary"])
    return table


def generation_table(r: dict[str, Any]) -> Table:
    """The summary of ``kvq generate``: speeds, memory beside the estimate, and the pass key if any."""
    gib = 1 << 30
    table = Table(title=Text(f"{r['model']}, {r['configuration']} ({r['dtype']}, {r['device']})"), show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    decode = r["decode_tokens_per_s"]
    rows = [
        ("prompt tokens", f"{r['prompt_tokens']:,}"),
        ("prefill", f"{r['prefill_tokens_per_s']:,.0f} tokens/s ({r['prefill_seconds']:.2f} s to the first token)"),
        ("decode", "n/a (one token)" if decode is None else f"{decode:,.2f} tokens/s ({r['new_tokens']} tokens; "
                   f"first step {r['first_step_seconds']:.2f} s)"),
        ("decode engine", f"{r['graph_steps']:,} CUDA-graph replays, {r['eager_steps']:,} eager steps"),
        ("peak memory", f"{r['peak_memory_bytes'] / gib:.2f} GiB (estimated {r['estimated_bytes'] / gib:.2f} GiB)"),
        ("cache", f"{r['cache_bytes'] / gib:.3f} GiB, {r['avg_bits']:.2f} bits/element "
                  f"(estimated {r['estimated_kv_bytes'] / gib:.3f} GiB)"),
    ]
    if r.get("kernel_steps") is not None:
        ref = r["reference_steps"]
        why = f": {r['reference_reason']}" if ref and r.get("reference_reason") else ""
        rows.append(("decode attention", f"{r['kernel_steps']:,} layer-steps Triton, "
                                         f"{'[yellow]' if ref else ''}{ref:,} PyTorch reference{why}"
                                         f"{'[/]' if ref else ''}"))
    if "passkey" in r:
        verdict = "[green]correct[/]" if r["passkey_correct"] else "[red]wrong[/]"
        rows.append(("pass key", f"{r['passkey']} -> {escape(str(r['passkey_answer']))} {verdict}"))
    for k, v in rows:
        table.add_row(k, v)
    return table
