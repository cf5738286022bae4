"""The runtime end to end: predicted against measured memory, and decode speed against the 16-bit cache.

A model with a preset's real shapes and random weights (bf16; said so in every report) is prefilled
through the packed cache (``kvq_cli.load_cache``) in chunks, then decodes ``--decode`` tokens. Reported
per method and context: the peak of ``torch.cuda.max_memory_allocated`` against estimate-memory's
prediction (KV + weights + allowance), the cache's own ``nbytes()`` against the predicted KV bytes, and
decode tokens/s beside transformers' 16-bit ``DynamicCache`` measured in the same run ("fp16" rows).

    python bench/memory_check.py --model llama-3-8b --contexts 32K,128K --out docs/results/runtime-e2e.json
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
from kvq_cli.hf_attention import cache_kwargs  # noqa: E402
from kvq_cli.memory import CONTEXT_OVERHEAD, parse_context  # noqa: E402
from kvq_cli.methods import parse_spec  # noqa: E402
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


def calibrated_states(method, model, device: str, samples: int = 2, seqlen: int = 1024):
    """Calibrate on random token ids through the real capture path, so outlier thresholds fit this model."""
    if not method.needs_calibration:
        return None
    from kvq_cli.calibration.capture import capture

    ids = torch.randint(0, model.config.vocab_size, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    return [method.fit(layer) for layer in capture(model, ids.to(device), method, max_tokens=4096)]


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


#: transformers' own quantized caches, compared where their backend package is installed (quanto, hqq).
HF_CACHES = {"hf-quanto4": ("quanto", 4), "hf-quanto2": ("quanto", 2), "hf-hqq4": ("hqq", 4), "hf-hqq2": ("hqq", 2)}


def make_cache(model, method, states, spec: str, tokens: int):
    """The cache to measure: DynamicCache (fp16), transformers' QuantizedCache (hf-*), or kvq's packed cache."""
    from transformers import DynamicCache

    if spec in HF_CACHES:
        from transformers import QuantizedCache

        backend, nbits = HF_CACHES[spec]
        return QuantizedCache(backend=backend, config=model.config, nbits=nbits)
    return DynamicCache() if method is None else load_cache((method, states), model, max_tokens=tokens)


@torch.no_grad()
def measure(model, method, states, context: int, chunk: int, decode: int, device: str, spec: str = "") -> dict:
    """Prefill ``context`` random tokens in chunks, then time ``decode`` greedy steps (method None: fp16)."""
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    cache = make_cache(model, method, states, spec, context + decode + 8)
    ids = torch.randint(0, model.config.vocab_size, (1, context), device=device)
    start = time.perf_counter()
    for a in range(0, context, chunk):
        out = model(ids[:, a : a + chunk], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill = time.perf_counter() - start
    token = out.logits.argmax(-1)
    model(token, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)  # warm-up step
    _sync(device)
    start = time.perf_counter()
    for _ in range(decode):
        token = model(token, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1).logits.argmax(-1)
    _sync(device)
    step = (time.perf_counter() - start) / max(decode, 1)
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    nbytes = cache.nbytes() if hasattr(cache, "nbytes") else sum(
        t.numel() * t.element_size() for layer in cache.layers for t in vars(layer).values() if torch.is_tensor(t))
    result = {"context": context, "cache_nbytes": nbytes, "peak_bytes": peak, "prefill_s": round(prefill, 2),
              "decode_tokens_per_s": round(1 / step, 2)}
    del cache, out
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3.2-1b", help="a preset name (random weights with its shapes)")
    p.add_argument("--contexts", default="8K,32K,128K")
    p.add_argument("--method", action="append",
                   help="method specs (default: fp16, kvquant 2-bit-1%%, kivi2); also " + ", ".join(HF_CACHES))
    p.add_argument("--chunk", type=int, default=4096)
    p.add_argument("--decode", type=int, default=8, help="timed decode steps")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(args.model, device)
    rows, extra = [], []
    for spec in args.method or ["fp16", "kvquant:bits=2,outliers=0.01", "kivi2"]:
        if spec in HF_CACHES:  # transformers' QuantizedCache: measured only (no kvq accounting for it)
            for ctx in [parse_context(c) for c in args.contexts.split(",")]:
                try:
                    m = measure(model, None, None, ctx, args.chunk, args.decode, device, spec)
                except (ImportError, ValueError, torch.cuda.OutOfMemoryError) as exc:
                    print(json.dumps({"name": spec, "context": ctx, "skipped": str(exc)[:200]}), flush=True)
                    continue
                print(json.dumps({"name": spec, **m}), flush=True)
                extra.append({"name": spec, **m})
            continue
        method = parse_spec(spec)
        states = calibrated_states(method, model, device)
        for ctx in [parse_context(c) for c in args.contexts.split(",")]:
            try:
                m = measure(model, None if spec == "fp16" else method, states, ctx, args.chunk, args.decode, device)
            except torch.cuda.OutOfMemoryError:
                print(json.dumps({"name": method.label, "context": ctx, "oom": True}), flush=True)
                torch.cuda.empty_cache()
                continue
            est = api.estimate_memory(args.model, context=ctx, methods=[method], gpu="h100-80gb")
            row = next(r for r in est["results"] if r["name"] == method.label)
            m.update(name=method.label, predicted_total=row["total_bytes"], predicted_kv=row["kv_bytes"],
                     weights=row["weights_bytes"])
            m["kv_error"] = m["cache_nbytes"] / row["kv_bytes"] - 1
            # the allocator never sees the CUDA context: compare its peak with the total less that overhead
            m["predicted_allocated"] = row["total_bytes"] - CONTEXT_OVERHEAD
            m["total_error"] = m["peak_bytes"] / m["predicted_allocated"] - 1 if m["peak_bytes"] else None
            rows.append(m)
            print(json.dumps(m), flush=True)
    doc = {"command": "python " + " ".join(sys.argv), "model": f"{args.model} shapes, random weights (bf16)",
           "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "rows": rows,
           "transformers_quantized_cache": extra}
    if args.out:
        Path(args.out).write_text(json.dumps(doc, indent=2))
    print("| method | context | cache bytes | KV predicted | error | peak allocated | predicted allocated | error "
          "| decode tok/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    gib = 2**30
    for r in rows:
        te = f"{r['total_error'] * 100:+.1f}%" if r["total_error"] is not None else "n/a"
        print(f"| {r['name']} | {r['context']:,} | {r['cache_nbytes'] / gib:.3f} GiB | {r['predicted_kv'] / gib:.3f}"
              f" GiB"
              f" | {r['kv_error'] * 100:+.2f}% | {r['peak_bytes'] / gib:.2f} GiB"
              f" | {r['predicted_allocated'] / gib:.2f} GiB"
              f" | {te} | {r['decode_tokens_per_s']} |")


if __name__ == "__main__":
    main()
