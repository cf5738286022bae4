"""The library API behind the CLI: each function returns data and never prints (progress goes to a callback).

torch, and the modules that use it, are imported inside the functions that need them: ``list_methods`` and
``estimate_memory`` (without artifacts) import neither torch nor transformers."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .accounting import avg_bits
from .data import load_text, tokenize, windows
from .errors import KvqError
from .hf_config import KVGeometry, geometry_from_config
from .methods import KVMethod
from .models import load_config, load_model, load_tokenizer, resolve_model, supported_config

if TYPE_CHECKING:
    from . import artifact as artifact_io
    from .perplexity import Configuration

Progress = Callable[[str, int, int], Callable[[int], None]]
"""``progress(description, total, unit_total)`` returns an ``advance(n)`` callback."""


def _no_progress(description: str, total: int, _units: int = 0) -> Callable[[int], None]:
    return lambda n: None


def check_device(device: str) -> None:
    """``--device`` names auto, cpu or cuda[:N] (whether a GPU is there is asked by ``resolve_device``)."""
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise KvqError(f"--device must be auto, cpu or cuda, not {device!r}")


def resolve_device(device: str = "auto") -> str:
    import torch

    check_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KvqError("--device cuda asked for, but no CUDA GPU is available")
    return device


def resolve_dtype(dtype: str, device: str, auto_gpu: str = "float32") -> str:
    """``auto``: float32 (exact reference numbers; the models we evaluate are small enough), or ``auto_gpu``
    on CUDA (``kvq generate``: bfloat16)."""
    if dtype == "auto":
        return auto_gpu if device.startswith("cuda") else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise KvqError(f"--dtype must be auto, float32, bfloat16 or float16, not {dtype!r}")
    return dtype


def load_net(source, dtype: str, device: str, device_map: str | None = None):
    """The model on ``device``, or spread over devices by ``device_map`` (``models.load_model``); returns it and
    the device its inputs go to (the embeddings')."""
    net = load_model(source, dtype, device, device_map=device_map)
    return net, (str(net.get_input_embeddings().weight.device) if device_map else device)


def load_artifact(path: str, geom: KVGeometry) -> artifact_io.Artifact:
    """Load an artifact, checked against a model of this geometry before any tensor is read."""
    from . import artifact as artifact_io

    if not path:
        raise KvqError("--artifact is empty: name an artifact file")
    return artifact_io.load(path, geom)


#: Largest ``--batch-size`` of eval-ppl.
MAX_BATCH = 4096
#: eval-ppl's ``--mode``: one pass with every K/V quantize-dequantized, or chunks through the packed cache.
MODES = ("simulated", "streaming")


def check_sink(method: KVMethod, seqlen: int, streaming: bool = False) -> None:
    """Refuse a sink (and, streaming, a residual window) that keeps every token of a window in 16 bits: the row
    would be the baseline under a quantized method's name."""
    if method.sink >= seqlen:
        raise KvqError(f"{method.label} keeps its first {method.sink} tokens in 16 bits (sink): with windows of "
                       f"{seqlen} tokens nothing would be quantized")
    if streaming and method.sink + method.residual >= seqlen:
        raise KvqError(f"{method.label} keeps {method.sink + method.residual} tokens in 16 bits (sink and residual "
                       f"window): with windows of {seqlen} tokens nothing would be quantized")


def configuration_for(
    method: KVMethod, geom: KVGeometry, seqlen: int, states=None, source: str = "", with_residual: bool = False
) -> Configuration:
    """A table row for a method (tuning-free ones need no states)."""
    from .perplexity import Configuration

    if method.needs_calibration and states is None:
        raise KvqError(f"method {method.name} needs calibration: run `kvq calibrate` and pass --artifact")
    state_bits = sum(method.state_bits(s) for s in states) if states else 0
    bits = avg_bits(method, geom, seqlen, state_bits, with_residual=with_residual)
    return Configuration(method.label, method, states, bits, source)


def check_eval_options(datasets: Sequence[str], seqlens: Sequence[int], max_windows: int | None, batch_size: int,
                       methods: Sequence[KVMethod], mode: str, chunk: int, chunk_attention: str) -> None:
    """The mistakes ``eval_ppl``'s options alone show (the CLI asks before torch loads)."""
    if chunk_attention not in ("full", "stored"):
        raise KvqError(f"--chunk-attention must be full or stored, not {chunk_attention!r}")
    if mode not in MODES:
        raise KvqError(f"--mode must be simulated or streaming, not {mode!r}")
    if chunk < 1:
        raise KvqError("--chunk must be at least 1")
    if not datasets or not seqlens or min(seqlens) < 2:
        raise KvqError("--seqlen must be at least 2 (and --dataset not empty)")
    if max_windows is not None and max_windows < 1:
        raise KvqError("--max-windows must be at least 1")
    if not 1 <= batch_size <= MAX_BATCH:
        raise KvqError(f"--batch (--batch-size) must be in 1..{MAX_BATCH}, not {batch_size}")
    for m in methods:
        for n in seqlens:
            check_sink(m, n, mode == "streaming")


def eval_ppl(
    model: str | None = None,
    dataset: str | Sequence[str] = "wikitext2",
    data_dir: str | None = None,
    seqlen: int | Sequence[int] = 2048,
    max_windows: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    batch_size: int = 1,
    artifacts: Sequence[str] = (),
    methods: Sequence[KVMethod] = (),
    mode: str = "simulated",
    progress: Progress = _no_progress,
    chunk: int = 128,
    chunk_attention: str = "full",
    device_map: str | None = None,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Perplexity of the baseline and of every configuration (artifacts first, then methods, in order).

    ``mode="streaming"`` feeds each window ``chunk`` tokens at a time through the packed runtime cache; each
    chunk attends to itself in full precision (``chunk_attention="full"``, as generation) or as stored.
    Several datasets and/or seqlens: the model loads once and the result is ``{"model", "mode", "device",
    "dtype", "seconds", "runs": [one single-run result per dataset and seqlen]}``.
    """
    from .perplexity import evaluate

    datasets = [dataset] if isinstance(dataset, str) else list(dict.fromkeys(dataset))
    seqlens = [seqlen] if isinstance(seqlen, int) else list(dict.fromkeys(seqlen))
    check_eval_options(datasets, seqlens, max_windows, batch_size, methods, mode, chunk, chunk_attention)
    streaming = mode == "streaming"
    device = resolve_device(device)
    texts = {name: load_text(name, data_dir) for name in datasets}  # a missing corpus is said before any model
    source = resolve_model(model, trust_remote_code)
    geom = geometry_from_config(supported_config(source))
    if geom.max_positions and max(seqlens) > geom.max_positions:
        raise KvqError(f"--seqlen {max(seqlens)} is beyond the model's {geom.max_positions} positions")
    loaded = [(path, load_artifact(path, geom)) for path in artifacts]
    configs: dict[int, list[Configuration]] = {}
    for n in seqlens:
        configs[n] = []
        for path, art in loaded:
            check_sink(art.method, n, streaming)
            configs[n].append(configuration_for(art.method, geom, n, art.states or None, path, streaming))
        configs[n] += [configuration_for(m, geom, n, None, "--method", streaming) for m in methods]
    tokenizer = load_tokenizer(source)
    grid = [(name, n, windows(tokenize(texts[name], tokenizer), n, max_windows)) for name in datasets
            for n in seqlens]
    net, device = load_net(source, resolve_dtype(dtype, device), device, device_map)
    start = time.perf_counter()
    advance = progress("perplexity", sum(w.shape[0] * (len(configs[n]) + 1) for _, n, w in grid), 0)
    extra = {"chunk": chunk, "chunk_attention": chunk_attention} if streaming else {}
    notes = [] if streaming else [
        f"{c.name}: simulated mode quantizes every token after the sink; its {c.method.residual}-token 16-bit residual "
        "window is not applied (--mode streaming applies it, as generation does)"
        for c in dict((c.name, c) for n in seqlens for c in configs[n]).values() if c.method.residual]
    runs = []
    for name, n, wins in grid:
        begun = time.perf_counter()
        results = evaluate(net, wins, configs[n], batch_size=batch_size, device=device, progress=advance, mode=mode,
                           chunk=chunk, full_chunk=chunk_attention == "full")
        runs.append({
            "model": source.name,
            "dataset": name,
            "seqlen": n,
            "windows": int(wins.shape[0]),
            "tokens": int(wins.numel()),
            "mode": mode,
            "device": _device_name(device),
            "dtype": resolve_dtype(dtype, device),
            "seconds": round(time.perf_counter() - begun, 2),
            "results": results,
            "notes": notes,
            **extra,
        })
    if len(runs) == 1:
        return runs[0]
    keep = ("model", "mode", "device", "dtype", "notes")
    return {**{k: runs[0][k] for k in keep}, "seconds": round(time.perf_counter() - start, 2), **extra, "runs": runs}


def check_calibrate_options(method: KVMethod, out: str, samples: int, seqlen: int, max_tokens: int, seed: int,
                            avg_bits_budget: float | None = None, search_outliers: bool = False) -> None:
    """The mistakes ``calibrate``'s options alone show (the CLI asks before torch loads)."""
    from .artifact import check_writable

    if not 1 <= samples <= 1 << 16 or seqlen < 2:
        raise KvqError("--samples must be in 1..65536 and --seqlen >= 2")
    if not 1 <= max_tokens <= 1 << 24:
        raise KvqError(f"--max-tokens must be in 1..{1 << 24}, not {max_tokens}")
    if not 0 <= seed < 1 << 63:
        raise KvqError(f"--seed must be in 0..2^63-1, not {seed}")
    if search_outliers and avg_bits_budget is None:
        raise KvqError("--outliers auto (outliers=auto) searches the outlier fraction within an --avg-bits budget: "
                       "give --avg-bits too")
    if avg_bits_budget is not None:
        _check_budget_options(method, avg_bits_budget)
    check_writable(out)
    if method.needs_calibration:
        check_sink(method, seqlen)


def calibrate(
    method: KVMethod,
    out: str,
    model: str | None = None,
    dataset: str = "wikitext2-valid",
    data_dir: str | None = None,
    samples: int = 16,
    seqlen: int = 2048,
    seed: int = 0,
    max_tokens: int = 16384,
    device: str = "auto",
    dtype: str = "auto",
    progress: Progress = _no_progress,
    device_map: str | None = None,
    trust_remote_code: bool = False,
    avg_bits_budget: float | None = None,
    search_outliers: bool = False,
) -> dict[str, Any]:
    """Fit ``method`` on calibration text and write its artifact to ``out`` (atomically).

    Tuning-free methods get a configuration-only artifact without loading the model's weights.
    ``avg_bits_budget`` (kvquant and kvquant-rot): key and value widths 1-4 per layer chosen to minimize the
    Fisher-weighted error within that many average bits at ``seqlen`` tokens (``calibration.allocate``), recorded in
    the artifact. ``search_outliers`` (with ``avg_bits_budget``): the outlier fraction too, the least-error
    allocation over ``allocate.OUTLIER_FRACTIONS`` (``method.outliers`` is then ignored; one capture serves them all).
    """
    import torch

    from . import artifact as artifact_io
    from .calibration.capture import capture_each, sample_windows

    check_calibrate_options(method, out, samples, seqlen, max_tokens, seed, avg_bits_budget, search_outliers)
    device = resolve_device(device)
    source = resolve_model(model, trust_remote_code)
    geom = geometry_from_config(supported_config(source))
    if method.needs_calibration and geom.max_positions and seqlen > geom.max_positions:
        raise KvqError(f"--seqlen {seqlen} is beyond the model's {geom.max_positions} positions")
    if avg_bits_budget is not None:
        _check_budget(method, geom, seqlen, avg_bits_budget, search_outliers)
    start = time.perf_counter()
    calibration: dict[str, Any] = {"dataset": dataset, "samples": samples, "seqlen": seqlen, "seed": seed}
    states: list = [{} for _ in range(geom.layers)]
    if method.needs_calibration:
        if source.random:  # random weights, no tokenizer: calibrate on random token ids (said in the artifact)
            ids = torch.randint(0, load_config(source).vocab_size, (samples * seqlen,),
                                generator=torch.Generator().manual_seed(seed))
            calibration["dataset"] = "random token ids"
        else:
            ids = tokenize(load_text(dataset, data_dir), load_tokenizer(source))
        windows_ = sample_windows(ids, samples, seqlen, seed)
        net, first = load_net(source, resolve_dtype(dtype, device), device, device_map)
        candidates = _outlier_candidates(method) if search_outliers else [method]
        stats_each = capture_each(net, windows_.to(first), candidates, max_tokens, seed, progress("capture", samples))
        stats = stats_each[0]
        del net
        if avg_bits_budget is not None and search_outliers:
            from .calibration.allocate import allocate_with_outliers

            advance = progress("fit 1-4 bits at each outlier fraction", geom.layers * len(candidates))
            method, states, calibration["allocation"] = allocate_with_outliers(
                method, stats_each, geom, seqlen, avg_bits_budget, advance, tuple(m.outliers for m in candidates))
        elif avg_bits_budget is not None:
            from .calibration.allocate import allocate, error_curves

            errors, fits = error_curves(method, stats, progress("fit 1-4 bits", geom.layers))
            method, states, calibration["allocation"] = allocate(method, errors, fits, geom, seqlen, avg_bits_budget)
        else:
            advance = progress("fit", geom.layers)
            states = []
            for i, layer in enumerate(stats):
                states.append({k: v.cpu() for k, v in method.for_layer(i).fit(layer).items()})
                advance(1)
        calibration["tokens"] = stats[0].tokens
    else:
        calibration = {"dataset": None, "note": "tuning-free: configuration only"}
    calibration["seconds"] = round(time.perf_counter() - start, 2)
    calibration["device"] = _device_name(device)
    art = artifact_io.Artifact(method, states, artifact_io.fingerprint(geom), calibration)
    path = artifact_io.save(art, out)
    return {
        "artifact": str(path),
        "method": method.config(),
        "name": method.label,
        "model": source.name,
        "layers": geom.layers,
        "avg_bits": avg_bits(method, geom, seqlen, art.state_bits(), with_residual=True),
        "avg_bits_tokens": seqlen,
        "calibration": calibration,
    }


def _check_budget_options(method: KVMethod, budget: float) -> None:
    """``--avg-bits`` as the options show it: kvquant or kvquant-rot without layer_bits, a number of bits."""
    import math

    if method.name not in ("kvquant", "kvquant-rot") or getattr(method, "layer_bits", ""):
        raise KvqError(f"--avg-bits chooses kvquant's (or kvquant-rot's) widths per layer; {method.label} does not "
                       "take it")
    if not math.isfinite(budget) or not 1 <= budget <= 16:
        raise KvqError(f"--avg-bits is a number of bits in [1, 16], not {budget:g}")


def _check_budget(method: KVMethod, geom: KVGeometry, seqlen: int, budget: float, search_outliers: bool = False
                  ) -> None:
    """``--avg-bits`` before any model loads: the options (``_check_budget_options``), global layers only, a
    reachable budget (with ``search_outliers``: at the least outlier fraction searched)."""
    import dataclasses

    from .calibration.allocate import OUTLIER_FRACTIONS, least_avg_bits

    _check_budget_options(method, budget)
    if geom.windows and any(w is not None for w in geom.windows):
        raise KvqError("--avg-bits: models with sliding-window layers are not supported yet (their fp16 rings count "
                       "in the average but take no width)")
    cheapest = dataclasses.replace(method, outliers=min(OUTLIER_FRACTIONS)) if search_outliers else method
    least = least_avg_bits(cheapest, geom, seqlen)
    if budget < least:
        raise KvqError(f"--avg-bits {budget:g} is below what {cheapest.label} can hold here (1 bit everywhere: "
                       f"{least:.3f} bits at {seqlen:,} tokens)")


def _outlier_candidates(method: KVMethod) -> list[KVMethod]:
    """``method`` at each outlier fraction ``--outliers auto`` tries (``allocate.OUTLIER_FRACTIONS``)."""
    import dataclasses

    from .calibration.allocate import OUTLIER_FRACTIONS

    return [dataclasses.replace(method, outliers=f) for f in OUTLIER_FRACTIONS]


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


def estimate_memory(
    model: str,
    context: str | int = "128K",
    batch: int = 1,
    methods: Sequence[KVMethod] = (),
    artifacts: Sequence[str] = (),
    weights_dtype: str = "bf16",
    gpu: str | None = None,
    budget: str | int | None = None,
    gpus: int = 1,
    plot: str | None = None,
    trust_remote_code: bool = False,
    chunk: int = 4096,
) -> dict[str, Any]:
    """KV cache, weights and workspace memory of each configuration (fp16 first) against a GPU budget.

    ``model`` is a preset (``kvq_cli.presets.MODEL_PRESETS``) or anything the model resolver takes (only
    its configuration is read). No methods and no artifacts: fp16, kivi2, kivi4, kvquant 4/3/2-bit-1%.
    With ``plot``, also writes a PNG of memory against context. Formulas: ``kvq_cli.memory``.
    """
    from . import memory

    if gpu is not None and budget is not None:
        raise KvqError("give --gpu or --budget, not both")
    tokens = memory.parse_context(context)
    budget_bytes = memory.parse_budget(budget) if budget is not None else None
    shape = memory.resolve_shape(model, trust_remote_code)
    entries = []
    for path in artifacts:
        art = load_artifact(path, shape.geometry())
        entries.append(memory.Entry(art.method.label, art.method, art.state_bits()))
    chosen = list(methods) if methods or artifacts else memory.default_methods()
    entries += [memory.Entry.from_method(m, shape) for m in chosen]
    plot_path = memory.check_plot_path(plot) if plot else None
    result = memory.estimate(shape, entries, tokens, batch, weights_dtype, budget_bytes, gpus, gpu, chunk)
    if plot_path is not None:
        from .plotting import memory_plot

        longest = max([tokens] + [r["max_context"] for r in result["results"]])
        per_gpu = result["budget_bytes"] / gpus
        curves = memory.curves(shape, entries, batch, weights_dtype, per_gpu, gpus, min(4 * longest, memory.MAX_SEARCH),
                               chunk)
        title = f"{shape.name}, batch {batch}, weights {weights_dtype}" + (
            f", layers split over {gpus} GPUs: the fullest GPU" if gpus > 1 else "")
        result["plot"] = str(memory_plot(plot_path, curves, per_gpu, title, tokens,
                                         {r["name"]: r["max_context"] for r in result["results"]}))
    return result


def list_methods() -> list[dict[str, Any]]:
    """Every registered method: name, supported bits, whether it needs calibration, options and defaults."""
    import dataclasses
    import sys

    from .methods import available, get_method_class

    out = []
    for name in available():
        cls = get_method_class(name)
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        options = {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
        out.append({"name": name, "bits": list(cls.supported_bits), "needs_calibration": cls.needs_calibration,
                    "options": options, "summary": doc[0] if doc else ""})
    return out
