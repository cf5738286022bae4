"""Rich tables and plain lines for the CLI (rendering only: every number comes from the library). Strings from the
user or the model (names, paths, generated text) are escaped: never read as rich markup."""

from __future__ import annotations

import re
from typing import Any

from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .accounting import describe

GIB = 1 << 30


def gib(n: float) -> str:
    return f"{n / GIB:,.2f} GiB"


def tokens(n: int) -> str:
    """``131072`` -> ``128K``, ``1048576`` -> ``1M``, ``134486`` -> ``131.3K`` (K = 1024, M = 1024^2)."""
    for unit, size in (("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n // size:,}{unit}" if n % size == 0 else f"{n / size:,.{1 if unit == 'K' else 2}f}{unit}"
    return f"{n:,}"


# --- eval-ppl -------------------------------------------------------------------------------------------------------
def ppl_table(result: dict[str, Any]) -> Table:
    """One table for one run or several (``runs``: a dataset and seqlen column, each run's baseline first)."""
    runs = result.get("runs", [result])
    several = len(runs) > 1
    windows = ", ".join(dict.fromkeys(f"{r['windows']} x {r['seqlen']}" for r in runs))
    what = runs[0]["dataset"] if not several else ", ".join(dict.fromkeys(r["dataset"] for r in runs))
    title = f"{result['model']} on {what}: windows x tokens {windows} ({result['mode']}, {result['dtype']}, " \
            f"{result['device']})"
    table = Table(title=Text(title), title_justify="left")
    cols = (["dataset", "seqlen"] if several else []) + ["configuration", "avg bits", "perplexity", "Δ ppl",
                                                        "KL (nats)", "top-1"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("dataset", "configuration") else "right")
    for run in runs:
        base = run["results"][0]["perplexity"]
        for i, r in enumerate(run["results"]):
            cells = [run["dataset"], f"{run['seqlen']:,}"] if several else []
            table.add_row(
                *cells,
                r["name"],
                f"{r['avg_bits']:.2f}",
                f"{r['perplexity']:.4f}",
                "" if i == 0 else f"{(r['perplexity'] / base - 1) * 100:+.2f}%",
                f"{r['kl_divergence']:.5f}",
                f"{r['top1_agreement'] * 100:.2f}%",
                end_section=several and i == len(run["results"]) - 1,
            )
    return table


def ppl_notes(result: dict[str, Any]) -> list[str]:
    """Below the eval-ppl table: how avg bits are counted (at each seqlen) and what simulated mode leaves out."""
    runs = result.get("runs", [result])
    streaming = result["mode"] == "streaming"
    lines = [describe(n, with_residual=streaming) for n in dict.fromkeys(r["seqlen"] for r in runs)]
    return lines + list(dict.fromkeys(n for r in runs for n in r.get("notes", [])))


# --- calibrate ------------------------------------------------------------------------------------------------------
def calibrated(result: dict[str, Any], seqlen: int) -> str:
    cal = result["calibration"]
    line = (f"{result['artifact']}: {result['name']} for {result['model']} ({result['layers']} layers, "
            f"{result['avg_bits']:.2f} avg bits at {seqlen:,} tokens with its 16-bit sink and residual window, as "
            f"every kvq command counts them; {cal['seconds']} s)")
    alloc = cal.get("allocation")
    if alloc:
        widths = " ".join(f"{k}/{v}" for k, v in alloc["widths"])
        line += (f"\n  widths per layer (keys/values), chosen for at most {alloc['avg_bits_budget']:g} avg bits by "
                 f"{alloc['criterion']}: {widths}")
    if alloc and "outlier_search" in alloc:
        line += "\n  " + _outlier_search(alloc)
    return line


def _outlier_search(alloc: dict[str, Any]) -> str:
    """The outlier fraction ``--outliers auto`` chose, and each fraction's least error within the budget."""
    tried = ", ".join(f"{float(f) * 100:g}%: " + (f"{e:.4g}" if e is not None else "over the budget")
                      for f, e in alloc["outlier_search"].items())
    return f"outlier fraction {alloc['outliers'] * 100:g}%, the least error of those tried ({tried})"


# --- estimate-memory ------------------------------------------------------------------------------------------------
def memory_table(result: dict[str, Any]) -> Table:
    """The estimate-memory table (GiB), fp16 first; with several GPUs the fullest GPU's bytes too."""
    gpus = result["gpus"]
    where = f"{result['gpu'] or 'budget'} {gib(result['budget_bytes'] / gpus)}" + (f" x {gpus}" if gpus > 1 else "")
    title = (f"{escape(result['model'])} ({result['params'] / 1e9:.2f}B params, {result['weights_dtype']}): "
             f"{tokens(result['context'])} tokens x batch {result['batch']} on {where}")
    table = Table(title=title, title_justify="left")
    cols = ["configuration", "avg bits", "KiB/tok", "KV GiB", "weights GiB", "total GiB"]
    cols += ["fullest GPU GiB"] if gpus > 1 else []
    for col in cols + ["fits", "max ctx"]:
        table.add_column(col, justify="left" if col == "configuration" else "right", no_wrap=True)
    for r in result["results"]:
        cells = [f"{r['kv_bytes'] / GIB:,.2f}", f"{r['weights_bytes'] / GIB:,.2f}", f"{r['total_bytes'] / GIB:,.2f}"]
        cells += [f"{max(p['total_bytes'] for p in r['placement']) / GIB:,.2f}"] if gpus > 1 else []
        table.add_row(escape(r["name"]), f"{r['avg_bits']:.2f}", f"{r['kv_bytes_per_token'] / 1024:,.1f}", *cells,
                      "yes" if r["fits"] else "[red]no[/]", tokens(r["max_context"]))
    return table


def memory_notes(result: dict[str, Any]) -> list[str]:
    """Below the estimate-memory table: what avg bits and the allowance count, and the placement per GPU."""
    parts = ", ".join(f"{name} {gib(n)}" for name, n in result["allowance_parts"].items())
    quantized = [r for r in result["results"][1:]]
    lines = [
        describe(result["context"], with_residual=True) + ".",
        f"total = KV + weights + allowance{' on every GPU' if result['gpus'] > 1 else ''}. The allowance is the "
        f"workspace of a {result['chunk']:,}-token prefill chunk (--chunk) beside 1 GiB of CUDA context; fp16's "
        f"{gib(result['allowance_bytes'])} = {parts}: transformers' SDPA path builds a mask over the whole context and "
        f"repeats K/V to the query heads, so it grows with the context"
        + (f", while the packed cache dequantizes a bounded block ({gib(quantized[0]['allowance_bytes'])} for "
           f"{quantized[0]['name']})." if quantized else "."),
        "max ctx: the longest context that fits (computed, not measured).",
    ]
    if result["gpus"] > 1:
        lines.append(f"Layers per GPU (GiB each: weights + KV + allowance; fits: the fullest GPU within "
                     f"{gib(result['budget_bytes'] / result['gpus'])}):")
        lines += ["  " + line for line in placement_lines(result)]
    return lines


def placement_lines(result: dict[str, Any]) -> list[str]:
    """``estimate-memory --gpus N``: which layers go on which GPU, per configuration, with units."""
    lines = []
    for r in result["results"]:
        if "placement" not in r:
            continue
        parts = [f"GPU{p['gpu']} layers {p['layers'][0]}-{p['layers'][1]}: {gib(p['total_bytes'])}"
                 + ("" if p["fits"] else " (over)") for p in r["placement"] if p["layers"]]
        lines.append(f"{r['name']}: " + "; ".join(parts))
    return lines


# --- methods --------------------------------------------------------------------------------------------------------
def _bits(m: dict[str, Any]) -> str:
    """Supported bit widths; for codebook methods (cq, pq) the bits per code and what they make per channel."""
    if m["bits"]:
        return "/".join(map(str, m["bits"]))
    o = m["options"]
    if "channels" in o:
        return f"1-12 per code of {o['channels']} channels (default {o['bits']}: {o['bits'] / o['channels']:g}/channel)"
    if "subspaces" in o:
        return f"1-12 per code of a subspace (default {o['bits']} per 2 dims: {o['bits'] / 2:g}/channel)"
    return "-"


def methods_table(methods: list[dict[str, Any]]) -> Table:
    """``kvq methods``: one row per registered method."""
    table = Table(title="KV-cache quantization methods: --method NAME, NAME<bits> or NAME:key=value,... in every "
                  "command", title_justify="left")
    for col in ("method", "bits", "calibrate", "options (defaults)", "what"):
        table.add_column(col)
    for m in methods:
        opts = ", ".join(f"{k}={v}" for k, v in m["options"].items())
        summary = re.sub(r"``?([^`]+)``?", r"\1", m["summary"])  # reST literals as plain words
        table.add_row(m["name"], _bits(m), "yes" if m["needs_calibration"] else "no", escape(opts), escape(summary))
    return table


# --- generate -------------------------------------------------------------------------------------------------------
def text_heading(config: dict[str, Any]) -> Text:
    """The label printed once above the generated text of one configuration."""
    what = config.get("artifact") or getattr(config.get("method"), "label", None) or "16-bit baseline"
    return Text.assemble(("generated text", "bold"), f" ({what}):")


def generation_table(r: dict[str, Any]) -> Table:
    """The summary of ``kvq generate``: speeds, memory beside the estimate, and the pass key if any."""
    table = Table(title=Text(f"{r['model']}, {r['configuration']} ({r['dtype']}, {r['device']})"), show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    decode = r["decode_tokens_per_s"]
    estimated = r.get("estimated_avg_bits")
    rows = [
        ("prompt tokens", f"{r['prompt_tokens']:,}"),
        ("prefill", f"{r['prefill_tokens_per_s']:,.0f} tokens/s ({r['prefill_seconds']:.2f} s to the first token)"),
        ("decode", "n/a (one token)" if decode is None else f"{decode:,.2f} tokens/s ({r['new_tokens']} tokens; "
                   f"first step {r['first_step_seconds']:.2f} s)"),
        ("decode engine", f"{r['graph_steps']:,} CUDA-graph replays, {r['eager_steps']:,} eager steps"),
        ("peak memory", f"{r['peak_memory_bytes'] / GIB:.2f} GiB (estimated {r['estimated_bytes'] / GIB:.2f} GiB)"),
        ("cache", f"{r['cache_bytes'] / GIB:.3f} GiB (estimated {r['estimated_kv_bytes'] / GIB:.3f} GiB)"),
        ("avg bits", f"{r['avg_bits']:.2f} measured" + (f", {estimated:.2f} estimated" if estimated else "")
                     + (f" at {r['avg_bits_tokens']:,} tokens" if r.get("avg_bits_tokens") else "")),
    ]
    if r.get("kernel_steps") is not None:
        ref = r["reference_steps"]
        why = f": {escape(str(r['reference_reason']))}" if ref and r.get("reference_reason") else ""
        rows.append(("decode attention", f"{r['kernel_steps']:,} layer-steps Triton, "
                                         f"{'[yellow]' if ref else ''}{ref:,} PyTorch reference{why}"
                                         f"{'[/]' if ref else ''}"))
    if "passkey" in r:
        verdict = "[green]correct[/]" if r["passkey_correct"] else "[red]wrong[/]"
        rows.append(("pass key", f"{r['passkey']} -> {escape(str(r['passkey_answer']))} {verdict}"))
    for k, v in rows:
        table.add_row(k, v)
    return table
