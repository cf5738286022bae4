"""Cheap CPU screen of cq / pq variants on SmolLM2-135M (docs/results/cq-pq-screening-cpu.md).

Captures calibration statistics once per key placement (pre-RoPE keys with Fisher for cq, post-RoPE keys
with Fisher for pq; ``capture``), then fits each spec from them and evaluates all of them side by side with
the fp16 baseline (``screen``). A spec may end in ``|k`` (only keys quantized) or ``|v`` (only values):
the error split. Fits are shared between specs that differ only in ``sink`` or ``outliers`` (neither changes
the codebooks). A screen, not the protocol of ``ppl_results.py``: fewer calibration samples and windows.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python bench/screen_cq_pq_cpu.py capture --samples 8
    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python bench/screen_cq_pq_cpu.py screen --windows 4 \\
        "pq:bits=8,kmeans_iters=8,max_samples=8192" "pq:bits=8,kmeans_iters=8,max_samples=8192|k"
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvq_cli.api import configuration_for, load_net  # noqa: E402
from kvq_cli.calibration.capture import capture, sample_windows  # noqa: E402
from kvq_cli.data import load_text, tokenize, windows  # noqa: E402
from kvq_cli.hf_attention import geometry_from_config  # noqa: E402
from kvq_cli.methods import LayerCalibration, parse_spec  # noqa: E402
from kvq_cli.models import load_config, load_tokenizer, resolve_model  # noqa: E402
from kvq_cli.perplexity import evaluate  # noqa: E402

CAPTURES = {"pre": "cq:fisher=true,pre_rope=true,sink=1", "post": "cq:fisher=true,pre_rope=false,sink=0"}


def run_capture(args) -> None:
    src = resolve_model(args.model)
    ids = tokenize(load_text("wikitext2-valid", args.data_dir), load_tokenizer(src))
    wins = sample_windows(ids, args.samples, args.seqlen, 0)
    net, _ = load_net(src, "float32", "cpu")
    for name, spec in CAPTURES.items():
        t = time.time()
        stats = capture(net, wins, parse_spec(spec), 16384, 0)
        torch.save([vars(s) for s in stats], Path(args.dir) / f"cap-{name}-{args.samples}.pt")
        print(f"captured {name} in {time.time() - t:.0f} s", flush=True)


def run_screen(args) -> None:
    src = resolve_model(args.model)
    geom = geometry_from_config(load_config(src))
    caps: dict[str, list[LayerCalibration]] = {}
    fits: dict[str, list] = {}
    configs = []
    for entry in args.specs:
        spec, _, only = entry.partition("|")
        method = parse_spec(spec)
        cap = "pre" if getattr(method, "pre_rope", False) else "post"
        if cap not in caps:
            caps[cap] = [LayerCalibration(**d) for d in torch.load(Path(args.dir) / f"cap-{cap}-{args.samples}.pt")]
        key = repr(dataclasses.replace(method, sink=0, outliers=0.0))
        t = time.time()
        if key not in fits:
            fits[key] = [method.fit(layer) for layer in caps[cap]]
        config = configuration_for(method, geom, args.seqlen, fits[key], spec)
        if only == "k":
            method.fake_quant_values = lambda v, state: v
            config.name += " [keys only]"
        elif only == "v":
            method.fake_quant_keys = lambda k, state: k
            config.name += " [values only]"
        print(f"fit {config.name} in {time.time() - t:.0f} s", file=sys.stderr, flush=True)
        configs.append(config)
    ids = tokenize(load_text("wikitext2", args.data_dir), load_tokenizer(src))
    net, _ = load_net(src, "float32", "cpu")
    rows = evaluate(net, windows(ids, args.seqlen, args.windows), configs)
    base = rows[0]["perplexity"]
    for row, entry in zip(rows, ["baseline", *args.specs], strict=True):
        delta = "" if entry == "baseline" else f"{(row['perplexity'] / base - 1) * 100:+.2f}%"
        print(f"| `{entry}` | {row['name']} | {row['avg_bits']:.2f} | {row['perplexity']:.4f} | {delta} | "
              f"{row['kl_divergence']:.5f} | {row['top1_agreement'] * 100:.2f}% |", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=["capture", "screen"])
    p.add_argument("specs", nargs="*")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--dir", default="/tmp/kvqs", help="where captures are kept")
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=4)
    args = p.parse_args()
    Path(args.dir).mkdir(parents=True, exist_ok=True)
    run_capture(args) if args.step == "capture" else run_screen(args)


if __name__ == "__main__":
    main()
