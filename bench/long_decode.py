"""Decode speed at long contexts on one or more GPUs: the packed cache against the 16-bit DynamicCache (not a test).

    python bench/long_decode.py --model random:llama-3-8b --method kivi2 --contexts 32K,128K,1M,max \
        --baseline-contexts 32K,128K,max --out docs/results/long-decode.json
    # issue 8, on 8 GPUs: kvq calibrate --model random:llama-2-7b --method kvquant --bits 2 --outliers 0.01 \
    #     --device-map kvq --out r7b.safetensors
    python bench/long_decode.py --model random:llama-2-7b --artifact r7b.safetensors --device-map kvq \
        --contexts 10M --baseline-contexts "" --steps 4 --out long-decode-10m.json
    # transformers' own QuantizedCache beside them (pip install optimum-quanto):
    python bench/long_decode.py --contexts 32K,128K --baseline-contexts 32K,128K --quantized-contexts 32K,128K \
        --out e2e.json

The model has the preset's shapes and RANDOM weights (bf16); ``--device-map kvq`` spreads its layers
over every visible GPU (each layer's cache on its GPU; "max" is then estimate-memory's split plan).
A prefill of an 8B model at 1M tokens takes far longer than a device command allows, so each cache is
FILLED DIRECTLY with random bf16 keys/values (N(0, 1)) instead: the packed cache through its own append
path (``Stream.append``: the method's encode, bit packing and residual window, on the GPU, exactly what
generation stores), the DynamicCache through ``update`` with one tensor per layer (its SDPA held to
FlashAttention / memory-efficient kernels, see ``run_dynamic``). Then ``--steps`` greedy decode steps of
the whole model run on top (after 2 warm-up steps) and are timed; the packed cache uses the Triton decode
kernels where exact. ``max``: for the packed cache, the largest context estimate-memory says fits
(``kvq_cli.memory``); for the DynamicCache, the largest fill that survives its decode steps, searched
down from the memory left after the weights in 5% steps (filling skips the prefill, whose activations
estimate-memory also counts, so this favours the baseline). Prints a table; writes JSON with peak memory and estimates.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from kvq_cli import memory
from kvq_cli.api import _device_name
from kvq_cli.generate import peak_memory
from kvq_cli.hf_attention import cache_kwargs
from kvq_cli.methods import parse_spec
from kvq_cli.models import load_config, load_model, resolve_model
from kvq_cli.presets import shape_from_config
from kvq_cli.runtime import load_cache

PROFILE = False


def fill_packed(cache, tokens: int, chunk: int = 65536) -> float:
    """Append ``tokens`` random K/V tokens to every layer of a ``KVQCache``; seconds taken."""
    _sync_all()
    start = time.perf_counter()
    for layer in cache.layers:
        h, d = cache.kv_heads, cache.head_dim
        state = layer.state()
        for s in range(0, tokens, chunk):
            n = min(chunk, tokens - s)
            dev = layer.attn.k_proj.weight.device  # the layer's own GPU (--device-map)
            k = torch.randn(1, h, n, d, device=dev, dtype=torch.bfloat16)
            v = torch.randn(1, h, n, d, device=dev, dtype=torch.bfloat16)
            if not layer.is_initialized:
                layer.lazy_initialization(k, v)
            layer.keys_stream.append(k, state, layer.method.encode_keys)
            layer.values_stream.append(v, state, layer.method.encode_values)
            layer.length += n
        if layer.index % 8 == 7:
            done = f"{layer.index + 1}/{len(cache.layers)}"
            print(f"  filled layer {done}: {time.perf_counter() - start:.0f} s", flush=True)
    _sync_all()
    return time.perf_counter() - start


def _sync_all() -> None:
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


def fill_dynamic(net, config, shape, tokens: int):
    from transformers import DynamicCache

    cache = DynamicCache(config=config)
    for i in range(shape.layers):
        dev = net.model.layers[i].self_attn.k_proj.weight.device
        k = torch.randn(1, shape.kv_heads, tokens, shape.head_dim, device=dev, dtype=torch.bfloat16)
        cache.update(k, torch.randn_like(k), i)
    return cache


@torch.inference_mode()
def decode_speed(net, cache, steps: int, profile: bool = False) -> float:
    """Tokens/s of ``steps`` greedy single-token forwards (after two warm-up steps)."""
    token = torch.tensor([[1]], device=net.get_input_embeddings().weight.device)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        net(input_ids=token, **cache_kwargs(net, cache), use_cache=True, logits_to_keep=1)
        with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
            net(input_ids=token, **cache_kwargs(net, cache), use_cache=True, logits_to_keep=1)
            torch.cuda.synchronize()
        print(p.key_averages().table(sort_by="cuda_time_total", row_limit=12), flush=True)
        print(p.key_averages().table(sort_by="cpu_time_total", row_limit=8), flush=True)
    for i in range(steps + 2):
        if i == 2:
            torch.cuda.synchronize()
            start = time.perf_counter()
        logits = net(input_ids=token, **cache_kwargs(net, cache), use_cache=True, logits_to_keep=1).logits
        token = logits[:, -1:].argmax(-1)
    torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)


def _peak() -> int:
    """Peak bytes allocated, summed over the GPUs."""
    return peak_memory(torch.device("cuda"), torch.cuda.device_count())


def run_packed(net, method, entry: memory.Entry, shape, tokens: int, steps: int) -> dict:
    """``method``: a tuning-free ``KVMethod`` or a ``(method, states)`` pair; ``entry`` its estimate entry."""
    _free()
    cache = load_cache(method, net, max_tokens=tokens + steps + 8)
    try:
        fill_s = fill_packed(cache, tokens)
        speed = decode_speed(net, cache, steps, PROFILE)
        from kvq_cli.runtime.kernel_path import kernel_cache

        kernels = all(kernel_cache(layer) is not None for layer in cache.layers)  # else the PyTorch reference
        return dict(cache="packed", configuration=entry.name, context=tokens, decode_tokens_per_s=speed,
                    triton_decode=kernels,
                    fill_seconds=fill_s, cache_bytes=cache.nbytes(), avg_bits=cache.avg_bits(),
                    peak_memory_bytes=_peak(),
                    estimated_kv_bytes=memory.kv_bytes(entry, shape, tokens))
    finally:
        cache.unbind()
        del cache


def run_dynamic(net, config, shape, tokens: int, steps: int) -> dict:
    """The 16-bit baseline. SDPA is held to its FlashAttention/memory-efficient kernels: torch's default
    choice on the H100, cuDNN attention, re-plans for every new sequence length (about 1.7 ms of CPU per
    call, 55 ms per decode step of 32 layers: measured with --profile), which would slow the baseline."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _free()
    cache = fill_dynamic(net, config, shape, tokens)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        speed = decode_speed(net, cache, steps, PROFILE)
    out = dict(cache="DynamicCache", configuration="fp16", context=tokens, decode_tokens_per_s=speed,
               cache_bytes=2 * shape.layers * shape.kv_heads * shape.head_dim * 2 * tokens,
               peak_memory_bytes=_peak())
    del cache
    return out


def run_quantized(net, config, shape, tokens: int, steps: int, backend: str, nbits: int) -> dict:
    """transformers' own ``QuantizedCache`` (``backend`` quanto or HQQ, ``nbits``), filled by one ``update`` per
    layer (its prefill path: everything quantized, an empty residual). Each decode step then dequantizes the
    whole cache to bf16 and attends with SDPA (held to FlashAttention / memory-efficient, as the baseline)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers.cache_utils import QuantizedCache

    _free()
    cache = QuantizedCache(backend=backend, config=config, nbits=nbits)
    for i in range(shape.layers):
        dev = net.model.layers[i].self_attn.k_proj.weight.device
        k = torch.randn(1, shape.kv_heads, tokens, shape.head_dim, device=dev, dtype=torch.bfloat16)
        cache.update(k, torch.randn_like(k), i)
        del k
    filled = _peak()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        speed = decode_speed(net, cache, steps, PROFILE)
    out = dict(cache=f"QuantizedCache({backend})", configuration=f"{backend}-int{nbits}", context=tokens,
               decode_tokens_per_s=speed, cache_bytes=0, peak_after_fill_bytes=filled, peak_memory_bytes=_peak())
    del cache
    return out


def largest_dynamic(net, config, shape, steps: int) -> dict:
    per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * 2
    _free()
    free = torch.cuda.mem_get_info()[0]
    tokens = int((free - (2 << 30)) / per_token)
    while tokens > 1024:
        try:
            return run_dynamic(net, config, shape, tokens, steps)
        except torch.OutOfMemoryError:
            tokens = int(tokens * 0.95)
    raise RuntimeError("no DynamicCache context fits")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:llama-3-8b")
    ap.add_argument("--method", default="kivi2", help="a tuning-free method spec")
    ap.add_argument("--artifact", default=None, help="a calibrated artifact instead of --method (random models "
                    "calibrate on random ids: kvq calibrate --model random:<preset>)")
    ap.add_argument("--device-map", default=None, help="kvq / auto: spread the layers over every visible GPU")
    ap.add_argument("--contexts", default="32K,128K,1M,max")
    ap.add_argument("--baseline-contexts", default="32K,128K,max")
    ap.add_argument("--quantized-contexts", default="", help="contexts for transformers' QuantizedCache too")
    ap.add_argument("--quantized-backends", default="quanto:4,quanto:2",
                    help="backend:nbits pairs for --quantized-contexts (needs optimum-quanto / hqq installed)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", required=True)
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of one decode step each")
    args = ap.parse_args()
    global PROFILE
    PROFILE = args.profile
    source = resolve_model(args.model)
    config = load_config(source)
    shape = shape_from_config(config, source.name)
    if args.artifact:
        from kvq_cli.artifact import load as load_artifact

        art = load_artifact(args.artifact)
        method = (art.method, art.states)
        entry = memory.Entry(art.method.label, art.method, art.state_bits())
    else:
        method = parse_spec(args.method)
        entry = memory.Entry.from_method(method, shape)
    net = load_model(source, "bfloat16", "cuda", device_map=args.device_map)
    gpus = torch.cuda.device_count() if args.device_map else 1
    budget = torch.cuda.get_device_properties(0).total_memory
    weights = memory.weights_bytes(shape, "bf16")

    def largest(e: memory.Entry) -> int:  # estimate-memory's longest context (split over the GPUs)
        if gpus > 1:
            from kvq_cli import placement

            return placement.max_context(e, shape, 1, "bf16", budget, gpus)
        return memory.max_context(e, shape, 1, weights, budget)

    rows = []

    def save(rows: list[dict]) -> None:  # after every row, so a later failure keeps what was measured
        with open(args.out, "w") as f:
            json.dump(dict(machine=_device_name("cuda"), model=args.model, rows=rows), f, indent=1)

    for c in [x for x in args.contexts.split(",") if x]:
        tokens = largest(entry) if c == "max" else memory.parse_context(c)
        try:
            row = run_packed(net, method, entry, shape, tokens, args.steps)
        except torch.OutOfMemoryError:
            row = dict(cache="packed", configuration=entry.name, context=tokens, decode_tokens_per_s=float("nan"),
                       cache_bytes=0, peak_memory_bytes=_peak(), out_of_memory=True)
        row["estimated_max_context"] = largest(entry)
        rows.append(row)
        print(row, flush=True)
        save(rows)
    for c in [x for x in args.baseline_contexts.split(",") if x]:
        row = (largest_dynamic(net, config, shape, args.steps) if c == "max"
               else run_dynamic(net, config, shape, memory.parse_context(c), args.steps))
        row["estimated_max_context"] = memory.max_context(memory.Entry.from_method(parse_spec("fp16"), shape), shape,
                                                          1, weights, budget)
        rows.append(row)
        print(row, flush=True)
        save(rows)
    for c in [x for x in args.quantized_contexts.split(",") if x]:
        for pair in args.quantized_backends.split(","):
            backend, nbits = pair.split(":")
            try:
                row = run_quantized(net, config, shape, memory.parse_context(c), args.steps, backend, int(nbits))
            except Exception as e:  # noqa: BLE001 - "where it runs": record why it did not
                row = dict(cache=f"QuantizedCache({backend})", configuration=f"{backend}-int{nbits}",
                           context=memory.parse_context(c), decode_tokens_per_s=float("nan"), cache_bytes=0,
                           peak_memory_bytes=_peak(), error=f"{type(e).__name__}: {str(e)[:300]}")
            rows.append(row)
            print(row, flush=True)
            save(rows)
    doc = dict(machine=_device_name("cuda"), model=args.model, weights="random (bf16)", rows=rows,
               command="python bench/long_decode.py " + " ".join(  # the options given (an artifact: no method)
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                   if v not in (None, False, "") and not (k == "method" and args.artifact)))
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    gib = 1 << 30
    print("| cache | configuration | context | decode tok/s | cache GiB | peak GiB |")
    for r in rows:
        print(f"| {r['cache']} | {r['configuration']} | {r['context']:,} | {r['decode_tokens_per_s']:.2f} | "
              f"{r['cache_bytes'] / gib:.2f} | {r['peak_memory_bytes'] / gib:.2f} |")


if __name__ == "__main__":
    main()
