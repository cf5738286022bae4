"""Would widths per KV head pay? The allocation proxy, per layer against per head (issue 21; not a test).

    python bench/per_head_widths.py --data-dir ../shared/data [--method kvquant-rot:outliers=0.01] [--samples 4]

``kvq calibrate --avg-bits`` picks one width (1-4 bits) per layer for keys and one for values, by a dynamic program
over the Fisher-weighted squared error of each stream (``kvq_cli/calibration/allocate.py``). This script measures
the same error per KV head: each layer is fitted once at each width (one codebook per layer and width, as the
allocation does), then each head's keys and values are quantized with it and their error summed apart. Two dynamic
programs then spend the same total code width:

* per layer: ``2L`` streams, a width step costs ``H`` head-widths (every head of the stream moves together);
* per head: ``2LH`` streams, a width step costs one.

For mean code widths of 1.5-3.5 bits it prints the least summed error of each and the reduction per-head widths
would buy. Codebooks, scales and outliers cost the same either way (a per-head layer keeps up to one codebook per
width it uses: at most ``2^4`` fp16 entries more per width, not counted), so the proxy compares like with like.
The proxy is what the allocation minimizes, not perplexity: a reduction here is an upper bound of what the search
could use, not a measured gain.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvq_cli.api import load_net, resolve_dtype  # noqa: E402
from kvq_cli.calibration.allocate import WIDTHS, _best_by_total, head_error_curves  # noqa: E402
from kvq_cli.calibration.capture import capture, sample_windows  # noqa: E402
from kvq_cli.data import load_text, tokenize  # noqa: E402
from kvq_cli.hf_config import geometry_from_config  # noqa: E402
from kvq_cli.methods import parse_spec  # noqa: E402
from kvq_cli.models import load_tokenizer, resolve_model, supported_config  # noqa: E402


def compare(errors: torch.Tensor, mean_widths: list[float]) -> list[dict]:
    """Least summed error per layer and per head at each mean code width (``errors``: ``head_error_curves``)."""
    L, _, H, _ = errors.shape
    per_layer = _best_by_total(errors.sum(dim=2))  # (L, 2, 4): all heads of a stream move together
    per_head = _best_by_total(errors.reshape(L, 2 * H, len(WIDTHS)))  # every (layer, stream, head) its own width
    rows = []
    for w in mean_widths:
        t = round(w * 2 * L)
        a, b = per_layer[t][0], per_head[t * H][0]
        rows.append({"mean_code_bits": t / (2 * L), "per_layer_error": a, "per_head_error": b,
                     "reduction": 1 - b / a})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--method", default="kvquant-rot:outliers=0.01")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--samples", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--out", default=None, help="JSON results path")
    args = p.parse_args()
    method = parse_spec(args.method)
    source = resolve_model(args.model)
    geom = geometry_from_config(supported_config(source))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids = tokenize(load_text("wikitext2-valid", args.data_dir), load_tokenizer(source))
    start = time.perf_counter()
    net, first = load_net(source, resolve_dtype("auto", device), device)
    stats = capture(net, sample_windows(ids, args.samples, args.seqlen).to(first), method)
    del net
    errors = head_error_curves(method, stats)
    rows = compare(errors, [1.5, 2.0, 2.5, 3.0, 3.5])
    print(f"{args.model} ({geom.layers} layers, {geom.kv_heads} KV heads), {method.name} at 1-4 bits with "
          f"{100 * method.outliers:g}% outliers, {args.samples} x "
          f"{args.seqlen} calibration tokens, {time.perf_counter() - start:.0f} s")
    print("| mean code bits | least error, widths per layer | per KV head | reduction |")
    print("| ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['mean_code_bits']:.2f} | {r['per_layer_error']:.4g} | {r['per_head_error']:.4g} | "
              f"{100 * r['reduction']:.1f}% |")
    spread = (errors.max(dim=2).values / errors.min(dim=2).values).median().item()
    print(f"median ratio of the worst to the best head's error (same layer, stream, width): {spread:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join(sys.argv), "method": method.label,
                                              "samples": args.samples, "seqlen": args.seqlen, "rows": rows,
                                              "errors": errors.tolist()}, indent=1))


if __name__ == "__main__":
    main()
