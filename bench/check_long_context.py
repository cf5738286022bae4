"""Kernel against reference at multi-million-token contexts on one GPU (not a test: CI has no GPU and no room).

    python bench/check_long_context.py --tokens 10M --method cq:channels=8,bits=8 --method kivi2 \
        --method kvquant:bits=2,outliers=0.01

At 10M tokens a layer's packed buffers pass 2**31 bytes and elements, and a grid's token blocks pass 65,535
programs, where a 32-bit offset would wrap and read the wrong tokens without an error. For each method: a
one-layer model with Llama-3-8B's attention shapes (32 query heads, 8 KV heads, head_dim 128; random weights,
bf16), its method state fitted on random keys and values, the cache filled with ``--tokens`` random keys and
values through its own append path (``KVQCache.update``, as ``engine.Decoder.fill`` does), then one decode step
with the Triton kernels and one with the blockwise PyTorch reference on the same cache. The values carry a ramp
over the positions (0 at the first, 8 at the last), so the mean of the output says which positions were read
(about 4 when all were): a kernel whose offsets wrap reads other tokens and its output moves away from the
reference's. Prints the largest difference and both means, with the fill and step times (the kernel's first
step includes its compilation).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from kvq_cli.calibration.capture import capture
from kvq_cli.memory import parse_context
from kvq_cli.methods import parse_spec
from kvq_cli.runtime import load_cache

DEV = "cuda"  # --device cpu (with TRITON_INTERPRET=1) runs a small check of this script itself


def one_layer_model():
    """Llama-3-8B's attention shapes in one layer (small MLP and vocabulary), random bf16 weights, on CUDA."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                         intermediate_size=256, num_hidden_layers=1, vocab_size=512, rope_theta=500000.0,
                         max_position_embeddings=1 << 25)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(DEV).eval()


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def fill(cache, tokens: int, chunk: int) -> float:
    """Append ``tokens`` random keys (N(0, 1)) and values (N(0, 1) plus a ramp from 0 at the first position to 8
    at the last, so the attention output says which positions were read) to layer 0; seconds taken."""
    layer = cache.layers[0]
    gen = torch.Generator(DEV).manual_seed(0)
    _sync()
    start = time.perf_counter()
    for s in range(0, tokens, chunk):
        n = min(chunk, tokens - s)
        k = torch.randn(1, 8, n, 128, device=DEV, dtype=torch.bfloat16, generator=gen)
        ramp = torch.arange(s, s + n, device=DEV, dtype=torch.float32) * (8.0 / tokens)
        v = (torch.randn(1, 8, n, 128, device=DEV, generator=gen) + ramp[:, None]).to(torch.bfloat16)
        if layer.method.keys_pre_rope:
            layer.pre_rope_key = k
        cache.update(k, v, 0, {"cache_position": torch.arange(s, s + n, device=DEV)})
    _sync()
    return time.perf_counter() - start


def check(spec: str, tokens: int, chunk: int) -> dict:
    model = one_layer_model()
    method = parse_spec(spec)
    ids = torch.randint(0, 512, (1, 256), device=DEV)
    states = [method.fit(s) for s in capture(model, ids, method)] if method.needs_calibration else None
    cache = load_cache((method, states) if states else method, model, batch_size=1, max_tokens=tokens)
    fill_s = fill(cache, tokens, chunk)
    layer = cache.layers[0]
    query = torch.randn(1, 32, 1, 128, device=DEV, dtype=torch.bfloat16)
    outs = []
    for use in (True, False):
        layer.use_kernel = use
        with torch.inference_mode():
            _sync()
            start = time.perf_counter()
            out = layer.attend(query, 128 ** -0.5).float()
            _sync()
            outs.append((out, time.perf_counter() - start))
    diff = (outs[0][0] - outs[1][0]).abs().max().item()
    row = {"method": method.label, "tokens": tokens, "fill_seconds": round(fill_s, 1),
           "kernel_steps": layer.kernel_steps, "reference_steps": layer.reference_steps,
           "kernel_s": round(outs[0][1], 4), "reference_s": round(outs[1][1], 3),
           "max_abs_diff": diff, "mean_output_kernel": outs[0][0].mean().item(),
           "mean_output_reference": outs[1][0].mean().item(), "cache_bytes": cache.nbytes(),
           "peak_bytes": torch.cuda.max_memory_allocated() if DEV == "cuda" else None}
    del cache, layer, model
    if DEV == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="10M")
    ap.add_argument("--method", action="append", required=True)
    ap.add_argument("--chunk", type=int, default=65536)
    ap.add_argument("--out")
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    global DEV
    DEV = args.device
    rows = []
    for spec in args.method:
        rows.append(check(spec, parse_context(args.tokens), args.chunk))
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name() if DEV == "cuda" else "cpu", "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
