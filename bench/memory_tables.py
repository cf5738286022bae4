"""Regenerate the computed tables of docs/results/memory-estimates.md (no GPU: arithmetic only).

    python bench/memory_tables.py > /tmp/tables.md
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvq_cli import api  # noqa: E402

SCENARIOS = [("llama-2-7b", "128K"), ("llama-2-7b", "1M"), ("llama-3-8b", "128K"), ("smollm2-135m", "8K")]
GIB = 1 << 30


def tokens(n: int) -> str:
    return f"{n / (1 << 20):.2f}M" if n >= 1 << 20 else f"{n / 1024:.1f}K"


def section(model: str, context: str) -> str:
    est = api.estimate_memory(model, context=context, gpu="h100-80gb")
    lines = [
        f"## {model}, {context} tokens, batch 1, bf16 weights, one H100 80GB (80 GiB)", "",
        f"`kvq estimate-memory --model {model} --context {context} --gpu h100-80gb`"
        " (add `--json` for the exact bytes)",
        "", f"Parameters {est['params']:,}.", "",
        "| configuration | avg bits | KV KiB/token | KV GiB | weights GiB | allowance GiB | total GiB | fits "
        "| max context |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | :---: | ---: |",
    ]
    for r in est["results"]:
        lines.append(
            f"| {r['name']} | {r['avg_bits']:.3f} | {r['kv_bytes_per_token'] / 1024:.1f} | {r['kv_bytes'] / GIB:.2f} | "
            f"{r['weights_bytes'] / GIB:.2f} | {r['allowance_bytes'] / GIB:.2f} | {r['total_bytes'] / GIB:.2f} | "
            f"{'yes' if r['fits'] else 'no'} | {tokens(r['max_context'])} ({r['max_context']:,}) |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print("\n".join(section(m, c) for m, c in SCENARIOS))
