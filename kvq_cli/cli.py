"""The ``kvq`` command line: parse options (``kvq_cli.options``, shared by every command), call the library, render
(``kvq_cli.render``). No numerical code here; torch and transformers are imported only by commands that run a model,
after every option-only check."""

from __future__ import annotations

import sys


def _interrupted_early(kind, value, tb, _previous=sys.excepthook):
    """Ctrl-C before the command's own handler is in place (while imports run): one line, not a traceback."""
    if issubclass(kind, KeyboardInterrupt):
        sys.stderr.write("kvq: interrupted\n")
        return
    _previous(kind, value, tb)


sys.excepthook = _interrupted_early

import json  # noqa: E402
import math  # noqa: E402
from typing import Annotated, Any  # noqa: E402

import typer  # noqa: E402

from . import options as o  # noqa: E402
from . import render  # noqa: E402
from .errors import KvqError  # noqa: E402
from .terminal import _import_torch_holding_ctrl_c, console, note, progress, say, user_errors  # noqa: E402

app = typer.Typer(
    cls=o.Group,
    help="Calibrate, evaluate and run quantized KV caches for Hugging Face causal LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        console.print(f"kvq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """kvq: calibrate, evaluate and run quantized KV caches (KVQuant, KIVI, CQ, MILLION, baselines).

    Every command takes the same words: --model, --method SPEC (repeatable), --artifact FILE (repeatable), the
    defaults --bits/--group/--residual/--outliers/--sink, --batch, --chunk, --device, --dtype, --json.
    `kvq methods` lists the methods; `kvq COMMAND --help` explains a command.
    """


def _dump(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


@app.command("eval-ppl")
@user_errors(torch=False)
@o.with_method_defaults
@o.runs_model
def eval_ppl(
    model: o.Model = "smollm2-135m",
    dataset: o.Datasets = None,
    data_dir: o.DataDir = None,
    seqlen: Annotated[list[int] | None, typer.Option(
        metavar="TOKENS", help="Tokens per non-overlapping window; repeat it for several lengths in one table "
        "[default: 2048].")] = None,
    max_windows: Annotated[int | None, typer.Option(metavar="N", help="Evaluate only the first N windows.")] = None,
    artifact: o.Artifact = None,
    method: o.Method = None,
    mode: Annotated[str, typer.Option(
        metavar="MODE", help="simulated: one pass, every K/V quantize-dequantized (no residual window); streaming: "
        "--chunk tokens at a time through the packed cache, residual windows and sinks as in generation.")
    ] = "simulated",
    chunk: o.chunk("--mode streaming: tokens per forward pass.") = 128,
    chunk_attention: Annotated[str, typer.Option(
        metavar="HOW", help="--mode streaming: each chunk attends to itself in full precision (full, as generation "
        "does) or as stored (stored, as simulated mode).")] = "full",
    batch: Annotated[int, typer.Option("--batch", metavar="N", help="Windows per forward pass.")] = 1,
    json_out: o.Json = False,
    defaults: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
) -> None:
    """Perplexity, KL divergence to the unquantized model and top-1 agreement of each configuration, in one table.

    The baseline (the model's own cache) comes first, then each --artifact, then each --method. Several --dataset
    and --seqlen values give one table (the model loads once).

    Examples:

        kvq eval-ppl --data-dir ../shared/data --max-windows 4 --method kivi2 --method int4
        kvq eval-ppl --dataset wikitext2 --dataset shakespeare --seqlen 512 --seqlen 2048 --method kivi2
    """
    from . import api

    run = {**run, "dtype": o.model_dtype(run["dtype"])}
    methods = o.methods(method, defaults, tuning_free=True)
    api.check_eval_options(dataset or ["wikitext2"], seqlen or [2048], max_windows, batch, methods, mode, chunk,
                           chunk_attention)
    o.check_corpora(dataset or ["wikitext2"], data_dir)
    o.check_run(model, run)
    _import_torch_holding_ctrl_c()
    with progress() as bar:
        result = api.eval_ppl(
            model=model, dataset=dataset or ["wikitext2"], data_dir=data_dir, seqlen=seqlen or [2048],
            max_windows=max_windows, batch_size=batch, artifacts=artifact or [], methods=methods, mode=mode,
            chunk=chunk, chunk_attention=chunk_attention, progress=bar.factory, **run,
        )
    if json_out:
        return _dump(result)
    console.print(render.ppl_table(result))
    for line in render.ppl_notes(result):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def _artifact_name(method, search_outliers: bool = False) -> str:
    return method.label.replace("%", "pct") + ("-outliers-auto" if search_outliers else "") + ".safetensors"


@app.command()
@user_errors(torch=False)
@o.with_calibrate_defaults
@o.runs_model
def calibrate(
    method: o.Method = None,
    out: Annotated[str, typer.Option(
        "--out", "-o", metavar="PATH", help="The artifact to write (.safetensors); with several --method, a folder "
        "that gets one LABEL.safetensors per method.")] = "kvq-artifact.safetensors",
    model: o.Model = "smollm2-135m",
    dataset: o.Dataset = "wikitext2-valid",
    data_dir: o.DataDir = None,
    samples: Annotated[int, typer.Option(metavar="N", help="Calibration sequences.")] = 16,
    seqlen: Annotated[int, typer.Option(metavar="TOKENS", help="Tokens per calibration sequence.")] = 2048,
    per_channel: Annotated[bool | None, typer.Option("--per-channel/--per-token", help="kvquant: key axis.")] = None,
    pre_rope: Annotated[bool | None, typer.Option("--pre-rope/--post-rope", help="kvquant, cq: keys before RoPE.")
                        ] = None,
    nuq: Annotated[bool | None, typer.Option("--nuq/--uniform", help="kvquant: k-means codebook or uniform.")] = None,
    fisher: Annotated[bool | None, typer.Option("--fisher/--no-fisher", help="kvquant, cq, pq: Fisher-weighted "
                                                "k-means.")] = None,
    qnorm: Annotated[bool | None, typer.Option("--qnorm/--no-qnorm", help="kvquant: Q-Norm of centroids.")] = None,
    seed: o.Seed = 0,
    max_tokens: Annotated[int, typer.Option(metavar="N", help="Token vectors kept per layer for codebook fitting.")
                          ] = 16384,
    avg_bits: o.AvgBits = None,
    json_out: o.Json = False,
    defaults: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
) -> None:
    """Fit each --method's per-layer codebooks and outlier thresholds on sample text; write one artifact each.

    --method: kvquant (the default; 1-4 bits), kvquant-rot (kvquant after turbo's rotation), cq (coupled
    quantization), pq (MILLION's product quantization), or a tuning-free kivi, int, nf, fp16 (a configuration-only
    artifact, no model weights read). Avg bits are counted as everywhere in kvq (see `kvq estimate-memory --help`),
    at --seqlen tokens. With --avg-bits, --outliers auto (or outliers=auto in the spec) also chooses the outlier
    fraction: 0, 0.5% or 1%, the least error within the budget.

    Examples:

        kvq calibrate --method kvquant --bits 3 --outliers 0.01 --data-dir ../shared/data --out kvq3.safetensors
        kvq calibrate --method cq:channels=8,bits=8 --method pq --data-dir ../shared/data --out artifacts/
        kvq calibrate --method kvquant --outliers 0.01 --avg-bits 2.5 --data-dir ../shared/data --out mix.safetensors
        kvq calibrate --method kvquant-rot --outliers auto --avg-bits 2.5 --data-dir ../shared/data -o rot.safetensors
    """
    from pathlib import Path

    from . import api

    defaults = {**defaults, **o.default_options(per_channel=per_channel, pre_rope=pre_rope, nuq=nuq, fisher=fisher,
                                                qnorm=qnorm)}
    run = {**run, "dtype": o.model_dtype(run["dtype"])}
    searched = o.calibration_methods(method, defaults, fallback=["kvquant"])
    specs = [m for m, _ in searched]
    outs = [out] if len(specs) == 1 else [str(Path(out) / _artifact_name(m, auto)) for m, auto in searched]
    if len(specs) > 1 and (Path(out).suffix == ".safetensors" or Path(out).is_file()):
        raise KvqError(f"--out {out}: with {len(specs)} --method entries --out is a folder (one artifact each)")
    for (spec, auto), path in zip(searched, outs, strict=True):
        api.check_calibrate_options(spec, path, samples, seqlen, max_tokens, seed, avg_bits, auto)
    if any(m.needs_calibration for m in specs) and not model.startswith("random:"):
        o.check_corpora([dataset], data_dir)
    o.check_run(model, run)
    if len(specs) > 1:
        Path(out).mkdir(parents=True, exist_ok=True)
    _import_torch_holding_ctrl_c()
    results = []
    for (spec, auto), path in zip(searched, outs, strict=True):
        with progress() as bar:
            result = api.calibrate(
                spec, path, model=model, dataset=dataset, data_dir=data_dir, samples=samples, seqlen=seqlen,
                seed=seed, max_tokens=max_tokens, progress=bar.factory, avg_bits_budget=avg_bits,
                search_outliers=auto, **run,
            )
        results.append(result)
        if not json_out:
            say(console, "wrote", "bold", render.calibrated(result, seqlen))
    if json_out:
        _dump(results[0] if len(results) == 1 else results)


@app.command("estimate-memory")
@user_errors(torch=False)
@o.with_method_defaults
def estimate_memory(
    model: Annotated[str, typer.Option(
        "--model", "-m", metavar="MODEL", help="A preset (llama-2-7b, llama-3-8b, llama-3.1-70b, mistral-7b, "
        "qwen2.5-7b, smollm2-135m, ...) or a local HF folder, .gguf file or hub id: only its configuration is read.")
    ] = "smollm2-135m",
    context: o.Context = "128K",
    batch: o.Batch = 1,
    method: o.Method = None,
    artifact: o.Artifact = None,
    dtype: Annotated[str, typer.Option(
        "--dtype", metavar="DTYPE", help="Weights: bf16, fp16, fp32, int8 or int4 (nominal bytes per parameter).")
    ] = "bf16",
    gpu: Annotated[str | None, typer.Option(
        metavar="NAME", help="h100-80gb (default), a100-80gb, a100-40gb, h200, l40s, a6000, rtx4090, rtx3090.")
    ] = None,
    budget: Annotated[str | None, typer.Option(
        metavar="BYTES", help="Memory per GPU instead of --gpu: 80GiB (2^30) or 80GB (1e9).")] = None,
    gpus: Annotated[int, typer.Option(
        metavar="N", help="GPUs of --gpu/--budget each: the layers are split over them (each layer's cache on its "
        "GPU, an allowance on every GPU); prints which layers go where.")] = 1,
    chunk: o.chunk("Prefill chunk whose activations the allowance counts.") = 4096,
    plot: Annotated[str | None, typer.Option(
        metavar="PNG", help="Also write a PNG of the table's total against context (the same numbers).")] = None,
    trust_remote_code: o.Trust = False,
    json_out: o.Json = False,
    defaults: dict[str, Any] | None = None,
) -> None:
    """Memory of the KV cache (16-bit first, then each configuration), weights and workspace against a GPU budget.

    Computed from the configuration alone (no weights read). Avg bits, here and in every command, = every bit the
    cache holds for K and V (codes, scales, zero points, sparse outliers and their row pointers, per-layer codebooks
    and thresholds, the 16-bit sink and residual window) / the number of K and V elements, at the stated context;
    the packed cache's nbytes() matches it. Without --method/--artifact: fp16, kivi2, kivi4, kvquant 4/3/2-bit-1%.

    Examples:

        kvq estimate-memory --model llama-3-8b --context 1M --gpu a100-80gb --method kivi2 --method kvquant:bits=2
        kvq estimate-memory --model llama-3.1-70b --context 1M --gpus 4 --budget 80GiB --plot mem.png
    """
    specs = method or ([] if artifact else None)
    methods = o.methods(specs, defaults)
    from . import api

    result = api.estimate_memory(
        model=model, context=context, batch=batch, methods=methods, artifacts=artifact or [],
        weights_dtype=o.weights_dtype(dtype), gpu=gpu, budget=budget, gpus=gpus, chunk=chunk, plot=plot,
        trust_remote_code=trust_remote_code,
    )
    for line in result["notes"]:
        note(line)
    if json_out:
        return _dump(result)
    console.print(render.memory_table(result))
    for line in render.memory_notes(result):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
    if "plot" in result:
        say(console, "wrote", "bold", result["plot"])


def _check_generate_options(model: str, prompt_file, haystack: bool, context, depth, max_new_tokens: int,
                            temperature: float, top_p: float, chunk: int, fill: str | None) -> None:
    """The mistakes the options alone show, said before torch or any model loads."""
    if chunk < 1:
        raise KvqError("--chunk must be at least 1")
    if fill not in (None, "random"):
        raise KvqError(f"--fill takes 'random', not {fill!r}")
    if haystack and prompt_file:
        raise KvqError("give --prompt-file or --haystack, not both")
    if depth is not None and not haystack:
        raise KvqError("--depth places the pass key of --haystack; without --haystack it does nothing")
    if haystack and context is None:
        raise KvqError("--haystack needs --context (the prompt's length in tokens)")
    if model.startswith("random:"):
        if haystack or prompt_file:
            raise KvqError(f"{model} has random weights and no tokenizer: give --context only (random ids)")
        if context is None:
            raise KvqError("a random-weight model needs --context (its prompt is that many random token ids)")
    elif not (haystack or prompt_file):
        raise KvqError("give --prompt-file F or --haystack (with --context N)")
    if max_new_tokens < 1:
        raise KvqError("--max-new-tokens must be at least 1")
    if not (math.isfinite(temperature) and math.isfinite(top_p) and (depth is None or 0 <= depth <= 1)):
        raise KvqError("--temperature and --top-p must be finite numbers, --depth between 0 and 1")
    if context is not None:
        from .memory import parse_context

        parse_context(context)


@app.command()
@user_errors(torch=False)
@o.with_method_defaults
@o.runs_model
def generate(
    model: o.Model = "smollm2-135m",
    artifact: o.Artifact = None,
    method: o.Method = None,
    prompt_file: Annotated[str | None, typer.Option("--prompt-file", "-f", metavar="FILE", help="Prompt text file "
                           "(repeated or cut to --context tokens).")] = None,
    haystack: Annotated[bool, typer.Option(
        "--haystack", help="A passkey-retrieval prompt of --context tokens (War and Peace filler); the answer is "
        "checked.")] = False,
    context: Annotated[str | None, typer.Option(
        "--context", "-c", metavar="TOKENS", help="Prompt length in tokens (8K, 128K, 1M; K = 1024): the file "
        "repeated or cut, or the haystack's size.")] = None,
    depth: Annotated[float | None, typer.Option(
        metavar="F", help="--haystack: where the pass key sits, 0 (start) to 1 (end); default 0.5.")] = None,
    max_new_tokens: Annotated[int, typer.Option(metavar="N", help="Tokens to generate (stops at end of sequence).")
                              ] = 32,
    chunk: o.chunk("Prompt tokens per prefill forward pass.") = 4096,
    seed: o.Seed = 0,
    filler: Annotated[str, typer.Option(
        metavar="NAME", help="The haystack's text: war-and-peace, shakespeare, wikitext2 or a text file.")
    ] = "war-and-peace",
    data_dir: o.DataDir = None,
    kernels: Annotated[bool | None, typer.Option(
        "--kernels/--no-kernels", help="Triton decode kernels (default: on CUDA).")] = None,
    temperature: Annotated[float, typer.Option(metavar="T", help="Sampling temperature; 0 = greedy (the default).")
                           ] = 0.0,
    top_k: Annotated[int, typer.Option(metavar="K", help="Sample among the k most likely tokens (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option(metavar="P", help="Sample among the most likely tokens up to this "
                                         "probability.")] = 1.0,
    graphs: Annotated[bool | None, typer.Option(
        "--graphs/--no-graphs", help="Capture the decode step once as a CUDA graph and replay it per token "
        "(default: on one CUDA device).")] = None,
    fill: Annotated[str | None, typer.Option(
        metavar="random", help="Fill all but the last of the --context positions with random keys and values through "
        "the cache's own append path instead of a prefill (minutes instead of hours at 1M-10M tokens; speed and "
        "memory only: nothing real is attended).")] = None,
    json_out: o.Json = False,
    defaults: dict[str, Any] | None = None,
    run: dict[str, Any] | None = None,
) -> None:
    """Generate from a long prompt through the packed quantized cache, with a memory pre-flight and a summary.

    Each --artifact, then each --method, runs in turn (none: the 16-bit baseline; on the CPU it runs in float32
    unless --dtype says otherwise, and is named so). The prompt is prefilled --chunk tokens at a time (history
    dequantized block by block, never whole), then decoded (greedy, or sampled with --temperature/--top-k/--top-p and
    --seed), on CUDA one CUDA-graph replay per token where the cache allows it. The summary gives time to first
    token, decode tokens/s, peak memory, cache bytes and avg bits (measured, beside estimate-memory's prediction at
    the same context). --model random:PRESET (e.g. random:llama-3.2-1b) runs random weights on random token ids.

    Examples:

        kvq generate --method kivi4 --haystack --context 4K --depth 0.25 --data-dir ../shared/data
        kvq generate --model random:llama-3.2-1b --method kivi2 --method int4 --context 32K --json
    """
    _check_generate_options(model, prompt_file, haystack, context, depth, max_new_tokens, temperature, top_p, chunk,
                            fill)
    run = {**run, "dtype": o.model_dtype(run["dtype"])}
    methods = o.methods(method or ([] if artifact else None), defaults, tuning_free=True)
    if haystack:
        o.check_corpora([filler], data_dir)
    o.check_run(model, run)
    _import_torch_holding_ctrl_c()
    runs: list[dict[str, Any]] = [{"artifact": a} for a in artifact or []] + [{"method": m} for m in methods]
    shared = dict(model=model, prompt_file=prompt_file, haystack=haystack, context=context, depth=depth,
                  max_new_tokens=max_new_tokens, chunk=chunk, seed=seed, data_dir=data_dir, filler=filler,
                  use_kernels=kernels, temperature=temperature, top_k=top_k, top_p=top_p, graphs=graphs, fill=fill,
                  **run)
    results = [_generate_one({**shared, **config}, json_out) for config in runs or [{}]]
    if json_out:
        _dump(results[0] if len(results) == 1 else results)


def _generate_one(kwargs: dict[str, Any], json_out: bool) -> dict[str, Any]:
    """One configuration of ``kvq generate``: notes as they come, the generated text under a label, the summary."""
    from .generate import generate as run_generate

    shown: list[str] = []
    heading = [render.text_heading(kwargs)]

    def note_now(line: str) -> None:
        note(line)
        shown.append(line)

    def on_text(piece: str) -> None:
        if heading:  # the label, once, before the first piece of generated text
            console.print(heading.pop(), highlight=False)
        console.print(piece, end="", highlight=False, markup=False)

    with progress(stop_when_done=True) as bar:
        result = run_generate(**kwargs, progress=bar.factory, on_text=(lambda piece: None) if json_out else on_text,
                              on_note=note_now)
    for line in result["notes"]:
        if line not in shown:
            note(line)
    if not json_out:
        console.print()
        console.print(render.generation_table(result))
    return result


@app.command("methods")
@user_errors(torch=False)
def methods(json_out: o.Json = False) -> None:
    """List the quantization methods, their bit widths and options: what --method NAME:key=value,... accepts."""
    from . import api

    rows = api.list_methods()
    if json_out:
        return _dump(rows)
    console.print(render.methods_table(rows))


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:  # between typer's parsing and the command's handler
        sys.stderr.write("kvq: interrupted\n")
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
