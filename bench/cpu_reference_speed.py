"""Prefill and decode tokens/s of the packed cache's CPU reference path beside the 16-bit cache, same process (not
a test).

    python bench/cpu_reference_speed.py --artifact kvquant-3b-1pct.safetensors --data-dir ../shared/data \
        [--method kivi4] [--context 2K] [--max-new-tokens 16] [--rounds 3] [--json OUT.json]

Each round runs ``kvq generate``'s library function (``kvq_cli.generate.generate``: chunked prefill, greedy
decoding, timed) on the same haystack prompt for the 16-bit ``DynamicCache`` (the baseline), the calibrated
``--artifact`` and each tuning-free ``--method`` (default kivi4), one after the other. A configuration's ratio
is taken against the baseline of its own round; the table gives the median over rounds (CPU timings on a
shared machine vary by 2x between minutes: only same-round ratios mean anything), the cache's bytes and the
decoded float K/V that the CPU reference path keeps beside it (``runtime.decoded``, not in the cache's bytes).
``--threads`` sets torch's intra-op threads (default: torch's own choice).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
from pathlib import Path

import torch

from kvq_cli.generate import generate
from kvq_cli.methods import parse_spec

SPEEDS = ("prefill_tokens_per_s", "decode_tokens_per_s")


def machine() -> str:
    """CPU model, cores and torch threads, e.g. ``Intel Xeon ... , 2 cores, torch 2.13.0 with 2 threads``."""
    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import os

    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads"


def commit() -> str:
    """``git describe``-like: the HEAD commit, ``+dirty`` when the work tree differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=False).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no")
                                                  else "")


def run_round(configs: dict[str, dict], common: dict) -> dict[str, dict]:
    """One run of every configuration: name -> ``generate``'s summary."""
    return {name: generate(**common, **kw) for name, kw in configs.items()}


def summarize(rounds: list[dict[str, dict]]) -> list[dict]:
    """Per configuration: median tokens/s over rounds and the median of same-round ratios to the baseline."""
    rows = []
    for name in rounds[0]:
        row = {"name": name, "passkey_correct": [r[name].get("passkey_correct") for r in rounds],
               "cache_bytes": rounds[0][name]["cache_bytes"], "mirror_bytes": rounds[0][name].get("mirror_bytes", 0)}
        for key in SPEEDS:
            row[key] = statistics.median(r[name][key] for r in rounds)
            row[key.replace("tokens_per_s", "ratio")] = statistics.median(
                r[name][key] / r["fp16 (DynamicCache)"][key] for r in rounds)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| configuration | prefill tok/s | x 16-bit | decode tok/s | x 16-bit | cache MiB | decoded mirror MiB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['prefill_tokens_per_s']:.1f} | {r['prefill_ratio']:.2f} | "
                     f"{r['decode_tokens_per_s']:.2f} | {r['decode_ratio']:.2f} | {r['cache_bytes'] / 2**20:.1f} | "
                     f"{r['mirror_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--artifact", action="append", default=[], help="calibrated artifacts (kvquant), repeatable")
    ap.add_argument("--method", action="append", default=None, help="tuning-free methods (default: kivi4)")
    ap.add_argument("--context", default="2K")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", default=None, help="write every round and the summary here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    configs: dict[str, dict] = {"fp16 (DynamicCache)": {}}
    configs |= {Path(a).stem: {"artifact": a} for a in args.artifact}
    configs |= {m: {"method": parse_spec(m)} for m in (args.method or ["kivi4"])}
    common = dict(model=args.model, haystack=True, context=args.context, max_new_tokens=args.max_new_tokens,
                  data_dir=args.data_dir, device="cpu", dtype="float32")
    rounds = []
    for i in range(args.rounds):
        rounds.append(run_round(configs, common))
        print(f"round {i + 1}: " + ", ".join(
            f"{n} {r['prefill_tokens_per_s']:.1f}/{r['decode_tokens_per_s']:.2f}" for n, r in rounds[-1].items()),
            flush=True)
    rows = summarize(rounds)
    head = (f"{args.model}, float32, {rounds[0]['fp16 (DynamicCache)']['prompt_tokens']}-token haystack, "
            f"{args.max_new_tokens} new tokens, {args.rounds} rounds; {machine()}; commit {commit()}")
    print(head)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"setup": head, "summary": rows, "rounds": rounds}, indent=1))


if __name__ == "__main__":
    main()
