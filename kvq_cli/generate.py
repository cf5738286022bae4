"""Long-context generation: a chunked prefill through the cache, then greedy decoding, timed.

``run`` is the loop (model, cache, prompt ids); ``preflight`` is estimate-memory's arithmetic applied to the
model, configuration and device before anything is allocated. ``kvq_cli.api.generate`` puts them together.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import memory
from .accounting import avg_bits
from .errors import KvqError
from .presets import ModelShape


def device_budget(device: str) -> tuple[int, str]:
    """Memory of the device (bytes) and its name: the GPU's total memory, or the machine's RAM."""
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return int(props.total_memory), props.name
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "cpu"


def preflight(shape: ModelShape, entry: memory.Entry, tokens: int, weights_dtype: str, budget: int, where: str,
              chunk: int, gpus: int = 1) -> dict[str, Any]:
    """Estimated bytes of ``tokens`` with ``entry``; refuses (``KvqError``) when they exceed ``budget`` (per GPU;
    with ``gpus`` > 1 the layers are split as ``placement.plan`` does), naming the largest context that fits
    with this configuration and the configuration that fits most."""
    from . import placement

    weights = memory.weights_bytes(shape, weights_dtype)

    def total_and_max(e: memory.Entry, t: int) -> tuple[float, float, int]:
        """(estimated bytes, the largest GPU's share, the largest context that fits)"""
        if gpus == 1:
            total = memory.total_bytes(e, shape, t, 1, weights, chunk)
            return total, total, memory.max_context(e, shape, 1, weights, budget, chunk)
        parts = placement.plan(e, shape, t, 1, weights_dtype, budget, gpus, chunk)
        return (sum(p["total_bytes"] for p in parts), max(p["total_bytes"] for p in parts),
                placement.max_context(e, shape, 1, weights_dtype, budget, gpus, chunk))

    total, largest, mine = total_and_max(entry, tokens)
    if largest <= budget:
        return {"estimated_bytes": total, "kv_bytes": memory.kv_bytes(entry, shape, tokens)}
    others = [memory.Entry.from_method(m, shape) for m in memory.default_methods()]
    best, most = max(((e, total_and_max(e, tokens)[2]) for e in others), key=lambda x: x[1])
    gib = 1 << 30
    on = f"{where} ({budget / gib:.1f} GiB)" + (f" x {gpus}" if gpus > 1 else "")
    raise KvqError(
        f"{tokens:,} tokens do not fit on {on}: {entry.name} needs an estimated {largest / gib:.1f} GiB"
        f"{' on its fullest GPU' if gpus > 1 else ''}; the largest context that fits is {mine:,} tokens with "
        f"{entry.name}, {most:,} with {best.name} (kvq estimate-memory shows the arithmetic)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_per_gpu(device: torch.device, gpus: int = 1) -> list[int] | None:
    """Peak bytes allocated by torch on each of ``gpus`` devices (``device`` alone for one) since the last reset;
    None on the CPU."""
    if device.type != "cuda":
        return None
    return [int(torch.cuda.max_memory_allocated(i)) for i in range(gpus)] if gpus > 1 else [
        int(torch.cuda.max_memory_allocated(device))]


def peak_memory(device: torch.device, gpus: int = 1) -> int:
    """Peak bytes allocated by torch on the GPU (summed over ``gpus`` devices) since the last reset; on the CPU
    the process's peak RSS."""
    if device.type == "cuda":
        return sum(peak_memory_per_gpu(device, gpus))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def greedy_steps(net: nn.Module, cache, ids: Tensor, chunk: int, advance: Callable[[int], None] = lambda n: None,
                 sampler=None, graphs: bool | None = False):
    """Prefill ``ids (B, N)`` ``chunk`` tokens at a time into ``cache``, then decode (``engine.Decoder``; greedy
    unless ``sampler``): yields each new token ``(B,)`` (the first from the prefill's logits), feeding it back
    when the next one is asked for. ``advance(n)`` after each prefill chunk."""
    from .engine import Decoder

    decoder = Decoder(net, cache, sampler, graphs)
    token = decoder.prefill(ids, chunk, advance)
    while True:
        yield token
        token = decoder.step(token)


def run(net: nn.Module, cache, ids: Tensor, max_new_tokens: int, chunk: int, eos: set[int],
        advance: Callable[[int], None] = lambda n: None, on_token: Callable[[int], None] = lambda t: None,
        sampler=None, graphs: bool | None = None, fill: int = 0) -> dict[str, Any]:
    """Prefill ``ids (1, N)`` ``chunk`` tokens at a time into ``cache`` (a ``KVQCache`` or a transformers cache),
    then decode up to ``max_new_tokens`` (stopping at an ``eos`` id) through ``engine.Decoder`` (``graphs``: a
    CUDA-graph step, None: where possible; ``sampler``: greedy by default).

    ``advance(n)`` after each prefill chunk, ``on_token(id)`` after each new token. Returns the new token ids
    and timings: the prefill (which gives the first token), the first decode step apart (it captures the
    graph and compiles kernels on a cold start) and the steady decode rate of the steps after it. ``fill``: the
    first ``fill`` positions are random keys and values appended without running the model
    (``Decoder.fill``; its time is reported apart), and only the rest of ``ids`` is prefilled."""
    from .engine import Decoder

    device = ids.device
    n = ids.shape[1] - fill
    decoder = Decoder(net, cache, sampler, graphs)
    _sync(device)
    start = time.perf_counter()
    if fill:
        decoder.fill(fill, chunk, advance)
        _sync(device)
    fill_s = time.perf_counter() - start
    start = time.perf_counter()
    token = decoder.prefill(ids[:, fill:], chunk, advance)
    new = [int(token[0])]
    prefill_s = time.perf_counter() - start
    on_token(new[0])
    first_step_s, steady_start = None, None
    start = time.perf_counter()
    while len(new) < max_new_tokens and new[-1] not in eos:
        token = decoder.step(token)
        new.append(int(token[0]))  # the sync that makes the step's time real
        if first_step_s is None:
            first_step_s = time.perf_counter() - start
            steady_start = time.perf_counter()
        on_token(new[-1])
    end = time.perf_counter()
    steps = len(new) - 1
    steady = steps - 1
    return {
        "new_ids": new,
        "fill_seconds": fill_s,
        "prefill_seconds": prefill_s,
        "decode_seconds": end - start,
        "decode_steps": steps,
        "first_step_seconds": first_step_s,
        "prefill_tokens_per_s": n / prefill_s if prefill_s > 0 else float("inf"),
        "decode_tokens_per_s": steady / (end - steady_start) if steady > 0 and end > steady_start else None,
        "graph_steps": decoder.stats["graph_steps"],
        "graph_captures": decoder.stats["captures"],
        "capture_error": decoder.stats.get("capture_error"),
        "eager_steps": decoder.stats["eager_steps"],
    }


def _cache_bytes(cache) -> int:
    """Bytes held by a ``KVQCache`` (``nbytes``) or a transformers cache (its key/value tensors)."""
    if hasattr(cache, "nbytes"):
        return int(cache.nbytes())
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            total += t.numel() * t.element_size() if isinstance(t, Tensor) else 0
    return total


def _eos_ids(net: nn.Module, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(net, "generation_config", None), tokenizer):
        eos = getattr(source, "eos_token_id", None)
        ids |= set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    return ids


def _configuration(artifact: str | None, method, geom, shape: ModelShape):
    """``(method, states, estimate entry)`` of ``--artifact`` or ``--method``; neither: ``(None, None, fp16)``."""
    from .api import load_artifact

    if artifact:
        art = load_artifact(artifact, geom)
        return art.method, art.states or None, memory.Entry(art.method.label, art.method, art.state_bits())
    if method is not None:
        if method.needs_calibration:
            raise KvqError(f"method {method.name} needs calibration: run `kvq calibrate` and pass --artifact")
        return method, None, memory.Entry.from_method(method, shape)
    from .methods import parse_spec

    return None, None, memory.Entry("fp16 (DynamicCache)", parse_spec("fp16"), 0)


def _prompt(source, vocab: int, tokens: int | None, haystack: bool, prompt_file: str | None, filler: str,
            data_dir: str | None, depth: float, seed: int, positions: int | None = None):
    """``(tokenizer or None, Prompt)`` for the options of ``kvq generate`` (random models: random ids)."""
    from .data import load_text, read_text_file
    from .models import load_tokenizer
    from .prompts import file_prompt, haystack_prompt, random_prompt

    if source.random:
        if haystack or prompt_file:
            raise KvqError(f"{source.name} has random weights and no tokenizer: give --context only (random ids)")
        if tokens is None:
            raise KvqError("a random-weight model needs --context (its prompt is that many random token ids)")
        return None, random_prompt(vocab, tokens, seed)
    tokenizer = load_tokenizer(source)
    if haystack:
        if tokens is None:
            raise KvqError("--haystack needs --context (the prompt's length in tokens)")
        return tokenizer, haystack_prompt(tokenizer, load_text(filler, data_dir), tokens, depth, seed)
    if prompt_file:  # read at most 64 bytes per token the prompt can use (cut to --context, else the positions)
        limit = 64 * (tokens if tokens is not None else positions or 1 << 24)
        text = read_text_file(Path(prompt_file).expanduser(), limit, cut=tokens is not None)
        return tokenizer, file_prompt(tokenizer, text, tokens)
    raise KvqError("give --prompt-file F or --haystack (with --context N)")


def generate(
    model: str | None = None,
    artifact: str | None = None,
    method=None,
    prompt_file: str | None = None,
    haystack: bool = False,
    context: str | int | None = None,
    depth: float | None = None,
    max_new_tokens: int = 32,
    chunk: int = 4096,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    data_dir: str | None = None,
    filler: str = "war-and-peace",
    use_kernels: bool | None = None,
    device_map: str | None = None,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    graphs: bool | None = None,
    fill: str | None = None,
    trust_remote_code: bool = False,
    progress=None,
    on_text: Callable[[str], None] = lambda s: None,
    on_note: Callable[[str], None] = lambda s: None,
) -> dict[str, Any]:
    """Prefill a prompt through the packed cache of ``artifact`` (or the tuning-free ``method``; neither: the
    16-bit baseline: a ``StaticCache`` under the same CUDA-graph engine, a ``DynamicCache`` without graphs) in
    chunks, then generate (greedy, or sampled with ``temperature`` / ``top_k`` / ``top_p``, seeded by ``seed``);
    returns the summary ``kvq generate --json`` prints. ``use_kernels``: the Triton decode path (None: on CUDA
    where exact); ``graphs``: the decode step as a CUDA graph (None: on one CUDA device); ``fill="random"``: all but
    the last of the ``context`` positions are random keys and values appended through the cache's own path
    without running the model (a context longer than a prefill could make in the time; speed and memory only)."""
    from .api import load_net, resolve_device, resolve_dtype
    from .engine import Sampler, static_cache
    from .hf_attention import geometry_from_config
    from .models import resolve_model, supported_config
    from .presets import shape_from_config
    from .prompts import passkey_answer

    if max_new_tokens < 1 or chunk < 1:
        raise KvqError("--max-new-tokens and --chunk must be at least 1")
    if not (torch.tensor([temperature, top_p]).isfinite().all() and (depth is None or 0 <= depth <= 1)):
        raise KvqError("--temperature and --top-p must be finite numbers, --depth between 0 and 1")
    sampler = Sampler(temperature, top_k, top_p)
    if artifact is not None and not artifact.strip():
        raise KvqError("--artifact is empty: name an artifact file")
    if artifact and method is not None:
        raise KvqError("give --artifact or --method, not both")
    if haystack and prompt_file:
        raise KvqError("give --prompt-file or --haystack, not both")
    if fill not in (None, "random"):
        raise KvqError(f"--fill takes 'random', not {fill!r}")
    if fill and (context is None or haystack or prompt_file):
        raise KvqError("--fill random needs --context N and no prompt (the context is random keys and values)")
    if depth is not None and not haystack:
        raise KvqError("--depth places the pass key of --haystack; without --haystack it does nothing")
    depth = 0.5 if depth is None else depth
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device, auto_gpu="bfloat16")
    tokens = memory.parse_context(context) if context is not None else None
    source = resolve_model(model, trust_remote_code)
    config = supported_config(source)
    geom = geometry_from_config(config)
    shape = shape_from_config(config, source.name)
    method, states, entry = _configuration(artifact, method, geom, shape)
    if method is not None:  # what the packed cache cannot hold is said before any weight is read
        from .runtime.cache import check_runtime

        check_runtime(method, geom)
    budget, where = device_budget(device)
    weights_dtype = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype]

    gpus = torch.cuda.device_count() if device_map and device.startswith("cuda") else 1

    def check(prompt_tokens: int) -> dict[str, Any]:
        return preflight(shape, entry, prompt_tokens + max_new_tokens, weights_dtype, budget, where, chunk, gpus)

    plan = check(tokens) if tokens is not None else None  # before building a prompt that cannot fit
    if fill:
        from .prompts import random_prompt

        tokenizer, prompt = None, random_prompt(shape.vocab, tokens, seed)
    else:
        tokenizer, prompt = _prompt(source, shape.vocab, tokens, haystack, prompt_file, filler, data_dir, depth,
                                    seed, geom.max_positions)
    n = prompt.ids.shape[1]
    notes = []
    if geom.max_positions and n + max_new_tokens > geom.max_positions and not source.random:
        notes.append(f"{n + max_new_tokens:,} tokens are beyond the model's {geom.max_positions:,} positions")
        on_note(notes[-1])  # said before the work starts
    plan = plan or check(n)
    wide = method is None and dtype == "float32"  # the model's own cache then holds float32, not 16 bits
    if wide:
        plan = {"estimated_bytes": plan["estimated_bytes"] + plan["kv_bytes"], "kv_bytes": 2 * plan["kv_bytes"]}
        notes.append("the baseline runs in float32 (--dtype auto on the CPU), so its cache holds 32 bits per element "
                     "and is named fp32; --dtype bfloat16 gives the 16-bit cache")
    # run
    dev = torch.device(device)
    for i in range(gpus if dev.type == "cuda" else 0):
        torch.cuda.reset_peak_memory_stats(i if gpus > 1 else dev)
    net, first = load_net(source, dtype, device, device_map)
    graphs = graphs if graphs is not None else (dev.type == "cuda" and gpus == 1 and not device_map)
    if graphs and (dev.type != "cuda" or device_map):
        raise KvqError("--graphs needs one CUDA device (no --device-map)")
    if method is None and graphs:
        cache = static_cache(net, 1, n + max_new_tokens)
    elif method is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=net.config)
    else:
        from .runtime import load_cache

        cache = load_cache((method, states), net, batch_size=1, max_tokens=n + max_new_tokens)
        for layer in cache.layers:
            layer.use_kernel = use_kernels
    ids, shown = [], [""]

    def on_token(t: int) -> None:
        ids.append(t)
        if tokenizer is not None:
            text = tokenizer.decode(ids, skip_special_tokens=True)
            on_text(text[len(shown[0]):])
            shown[0] = text

    label = "fill (random K/V) + prefill" if fill else "prefill"
    advance = progress(label, n, 0) if progress else (lambda k: None)
    try:
        torch.manual_seed(seed)  # the sampler's random numbers (greedy uses none)
        out = run(net, cache, prompt.ids.to(first), max_new_tokens, chunk, _eos_ids(net, tokenizer), advance,
                  on_token, sampler, None if method is not None and graphs else graphs, n - 1 if fill else 0)
    finally:
        if hasattr(cache, "unbind"):
            cache.unbind()
    text = shown[0] if tokenizer is not None else " ".join(map(str, out["new_ids"]))
    steps = cache.decode_steps() if hasattr(cache, "decode_steps") else {
        "kernel_steps": None, "reference_steps": None, "reference_reason": None}  # the 16-bit baseline
    if out["capture_error"]:
        notes.append(f"the decode step could not be captured as a CUDA graph; it ran eagerly: {out['capture_error']}")
    elif graphs and out["eager_steps"] and method is not None:
        why = ("no graph step for this configuration yet (graph steps: kivi with a group that is a power of two "
               ">= 16, int, nf, kvquant with per-channel pre-RoPE keys and one codebook per layer, cq and pq "
               "without outliers, pre-RoPE cq without a residual window)"
               if not cache.capturable()
               else "the first steps (sink filling, nothing packed yet) run eagerly")
        notes.append(f"{out['eager_steps']:,} of {out['decode_steps']:,} decode steps ran eagerly, not as a CUDA "
                     f"graph replay: {why}")
    if steps["reference_steps"]:
        notes.append(f"{steps['reference_steps']:,} of {steps['reference_steps'] + steps['kernel_steps']:,} decode "
                     f"layer-steps ran the PyTorch reference path: {steps['reference_reason']}")
    cache_bytes = _cache_bytes(cache)
    held = n + out["decode_steps"]
    elements = 2 * shape.layers * shape.kv_heads * shape.head_dim * held
    estimated_bits = avg_bits(entry.method, geom, held, entry.state_bits) * (2 if wide else 1)
    result = {
        "model": source.name,
        "configuration": ("fp16 (StaticCache)" if method is None and graphs else entry.name).replace(
            "fp16", "fp32" if wide else "fp16"),
        "device": where,
        "dtype": dtype,
        "prompt_tokens": n,
        "new_tokens": len(out["new_ids"]),
        "generated_text": text,
        "prefill_tokens_per_s": out["prefill_tokens_per_s"],
        "decode_tokens_per_s": out["decode_tokens_per_s"],
        "prefill_seconds": out["prefill_seconds"],
        "fill": fill,
        "fill_seconds": out["fill_seconds"],
        "time_to_first_token_s": out["prefill_seconds"],
        "first_step_seconds": out["first_step_seconds"],
        "decode_seconds": out["decode_seconds"],
        "graph_steps": out["graph_steps"],
        "graph_captures": out["graph_captures"],
        "capture_error": out["capture_error"],
        "eager_steps": out["eager_steps"],
        "sampling": "greedy" if sampler.greedy else {"temperature": temperature, "top_k": top_k, "top_p": top_p,
                                                       "seed": seed},
        "peak_memory_bytes": peak_memory(dev, gpus),
        "peak_memory_per_gpu_bytes": peak_memory_per_gpu(dev, gpus) if gpus > 1 else None,
        "cache_bytes": cache_bytes,
        # decoded float K/V the CPU reference path kept beside the packed cache (``runtime.decoded``; not in
        # cache_bytes or avg_bits)
        "mirror_bytes": cache.mirror_nbytes() if hasattr(cache, "mirror_nbytes") else 0,
        "weights_bytes": sum(p.numel() * p.element_size() for p in net.parameters()),
        "avg_bits": 8 * cache_bytes / elements,
        "estimated_avg_bits": estimated_bits,
        "avg_bits_tokens": held,
        "estimated_bytes": plan["estimated_bytes"],
        "estimated_kv_bytes": plan["kv_bytes"],
        "budget_bytes": budget * gpus,
        "gpus": gpus,
        "chunk": chunk,
        **steps,
        "notes": notes,
    }
    if prompt.passkey is not None:
        answer = passkey_answer(text)
        result.update(passkey=prompt.passkey, passkey_answer=answer, passkey_correct=answer == prompt.passkey,
                      depth=prompt.depth, seed=seed)
    return result
