"""Predicted (``kvq estimate-memory``) against measured GPU memory of the runtime cache, at several contexts.

A model with a preset's real shapes and random weights (bf16) is prefilled through the packed cache
(``kvq_cli.load_cache``) in chunks, then decodes one token; the peak of ``torch.cuda.max_memory_allocated``
is compared with estimate-memory's prediction (KV + weights + allowance) and the cache's own
``nbytes()`` with the predicted KV bytes.

    python bench/memory_check.py --model llama-3.2-1b --contexts 8K,32K,128K --out docs/results/memory-check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvq_cli import api, load_cache  # noqa: E402
from kvq_cli.memory import parse_context  # noqa: E402
from kvq_cli.methods import LayerCalibration, parse_spec  # noqa: E402
from kvq_cli.presets import MODEL_PRESETS  # noqa: E402


def build_model(name: str, device: str):
    """A Llama-architecture model with the preset's shapes and random weights (said so in every report)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    s = MODEL_PRESETS[name]
    cfg = LlamaConfig(
        vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
        num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
        max_position_embeddings=1 << 24, tie_word_embeddings=s.tied_embeddings, rope_theta=s.rope_theta,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    return model.eval()


def synthetic_states(method, model, layers: int):
    """Fit the method on random calibration vectors (memory does not depend on the codebooks' values)."""
    if not method.needs_calibration:
        return None
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    shape = (4096, cfg.num_key_value_heads, cfg.head_dim)
    calib = LayerCalibration(torch.randn(shape, generator=g), torch.randn(shape, generator=g),
                             torch.ones(shape), torch.ones(shape))
    state = method.fit(calib)
    return [state for _ in range(layers)]


@torch.no_grad()
def measure(model, method, states, context: int, chunk: int, device: str) -> dict:
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cache = load_cache((method, states), model, max_tokens=context + 8)
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    start = time.perf_counter()
    for a in range(0, context, chunk):
        out = model(ids[:, a : a + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
    model(out.logits.argmax(-1), past_key_values=cache, use_cache=True, logits_to_keep=1)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    result = {"context": context, "cache_nbytes": cache.nbytes(), "peak_bytes": peak, "seconds": round(seconds, 1)}
    del cache, out
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.2-1b", help="a preset name (random weights with its shapes)")
    p.add_argument("--contexts", default="8K,32K,128K")
    p.add_argument("--method", action="append", help="method specs (default: kvquant 2-bit-1%% and kivi2)")
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.model, device)
    rows = []
    for spec in args.method or ["kvquant:bits=2,outliers=0.01", "kivi2"]:
        method = parse_spec(spec)
        states = synthetic_states(method, model, model.config.num_hidden_layers)
        for ctx in [parse_context(c) for c in args.contexts.split(",")]:
            m = measure(model, method, states, ctx, args.chunk, device)
            est = api.estimate_memory(args.model, context=ctx, methods=[method], gpu="h100-80gb")
            row = next(r for r in est["results"] if r["name"] == method.label)
            m.update(name=method.label, predicted_total=row["total_bytes"], predicted_kv=row["kv_bytes"],
                     weights=row["weights_bytes"])
            m["kv_error"] = m["cache_nbytes"] / row["kv_bytes"] - 1
            m["total_error"] = m["peak_bytes"] / row["total_bytes"] - 1 if m["peak_bytes"] else None
            rows.append(m)
            print(json.dumps(m), flush=True)
    doc = {"command": "python " + " ".join(sys.argv), "model": f"{args.model} shapes, random weights (bf16)",
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2))
    print("| method | context | cache bytes | KV predicted | error | peak allocated | total predicted | error |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    gib = 2**30
    for r in rows:
        te = f"{r['total_error'] * 100:+.1f}%" if r["total_error"] is not None else "n/a"
        print(f"| {r['name']} | {r['context']:,} | {r['cache_nbytes'] / gib:.3f} GiB | {r['predicted_kv'] / gib:.3f}"
              f" GiB"
              f" | {r['kv_error'] * 100:+.2f}% | {r['peak_bytes'] / gib:.2f} GiB | {r['predicted_total'] / gib:.2f} GiB"
              f" | {te} |")


if __name__ == "__main__":
    main()
