"""The ``kvq`` command line: parse options, call ``kvq_cli.api``, render with rich. No numerical code here."""

from __future__ import annotations

import sys


def _interrupted_early(kind, value, tb, _previous=sys.excepthook):
    """Ctrl-C before the command's own handler is in place (while imports run): one line, not a traceback."""
    if issubclass(kind, KeyboardInterrupt):
        sys.stderr.write("kvq: interrupted\n")
        return
    _previous(kind, value, tb)


sys.excepthook = _interrupted_early

import functools  # noqa: E402
import json  # noqa: E402
from typing import Annotated, Any  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import (  # noqa: E402
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text  # noqa: E402

from . import render  # noqa: E402
from .errors import KvqError  # noqa: E402

app = typer.Typer(
    help="Calibrate, evaluate and run quantized KV caches for Hugging Face causal LMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True)
console = Console()

ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="Local HF folder, .gguf file, hub id, or built-in alias (smollm2-135m).")
]
DatasetOpt = Annotated[
    str,
    typer.Option(
        "--dataset",
        "-d",
        help="wikitext2 (test), wikitext2-valid, shakespeare, war-and-peace, pg19, c4, or a path to a text file.",
    ),
]
DataDirOpt = Annotated[
    str | None,
    typer.Option(
        "--data-dir", help="Folder with local corpus copies (default: $KVQ_DATA_DIR); looked at before the hub."
    ),
]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
DeviceMapOpt = Annotated[
    str | None,
    typer.Option("--device-map", help="Spread the layers over all visible GPUs with accelerate: auto, balanced, "
                 "sequential, or kvq (even blocks of layers, as estimate-memory --gpus plans); each layer's cache "
                 "stays on its layer's GPU."),
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="auto (float32), float32, bfloat16 or float16.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of a table.")]
TrustOpt = Annotated[
    bool, typer.Option("--trust-remote-code", help="Run Python code that comes with the model (auto_map); off: such "
                       "a model is refused. Only for a model you trust.")
]


def say(where: Console, label: str, style: str, message: str) -> None:
    """``label`` styled, then ``message`` as plain text (user strings are never read as rich markup)."""
    where.print(Text.assemble((label, style), " ", str(message)), highlight=False, soft_wrap=True)


def _import_torch_holding_ctrl_c() -> None:
    """Import torch with Ctrl-C held until the import is done (interrupted inside torch's C++ start-up, the process
    aborts with a C++ message), then act on it."""
    import signal
    import threading

    if "torch" in sys.modules or threading.current_thread() is not threading.main_thread():
        return
    hit: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda *_: hit.append(1))
    try:
        import torch  # noqa: F401
    finally:
        signal.signal(signal.SIGINT, previous)
    if hit:
        raise KeyboardInterrupt


def user_errors(fn):
    """One line on stderr and exit code 2 for user mistakes; never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            _import_torch_holding_ctrl_c()
            return fn(*args, **kwargs)
        except KvqError as exc:
            say(err, "kvq: error:", "bold red", str(exc))
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("kvq: interrupted")
            raise typer.Exit(130) from None
        except MemoryError:
            say(err, "kvq: error:", "bold red", "out of memory: try a smaller --seqlen, --batch-size or model")
            raise typer.Exit(2) from None

    return wrapper


def progress_factory(progress: Progress, stop_when_done: bool = False):
    """Adapter from the API's progress callback protocol to a rich progress bar (``stop_when_done``: stop the
    live display once the task completes, e.g. before generated text streams to the terminal)."""

    def make(description: str, total: int, _units: int = 0):
        task = progress.add_task(description, total=total)

        def advance(n: int) -> None:
            progress.advance(task, n)
            if stop_when_done and progress.tasks[task].finished:
                progress.stop()

        return advance

    return make


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
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

    Start with `kvq eval-ppl --help`; every command takes --model (default: the built-in smollm2-135m).
    """


def _method_defaults(**options: Any) -> dict[str, Any]:
    return {k: v for k, v in options.items() if v is not None}


@app.command("eval-ppl")
@user_errors
def eval_ppl(
    model: ModelOpt = "smollm2-135m",
    dataset: DatasetOpt = "wikitext2",
    data_dir: DataDirOpt = None,
    seqlen: Annotated[int, typer.Option(help="Tokens per non-overlapping window.")] = 2048,
    max_windows: Annotated[int | None, typer.Option(help="Evaluate only the first N windows.")] = None,
    artifact: Annotated[
        list[str] | None, typer.Option("--artifact", "-a", help="A calibrated artifact (repeatable).")
    ] = None,
    method: Annotated[
        list[str] | None,
        typer.Option(
            "--method",
            help="A tuning-free method (repeatable): NAME, NAME<bits> or NAME:key=value,... "
            "e.g. kivi2, int4, nf:bits=3, kivi:bits=4,group=64.",
        ),
    ] = None,
    bits: Annotated[int | None, typer.Option(help="Default bit width for --method entries that set none.")] = None,
    group: Annotated[int | None, typer.Option(help="Default KIVI group size for --method entries.")] = None,
    mode: Annotated[
        str,
        typer.Option(help="simulated: one pass, every K/V quantized; streaming: chunks through the packed cache "
                     "(residual windows as in generation)."),
    ] = "simulated",
    chunk: Annotated[int, typer.Option(help="Tokens per forward pass in --mode streaming.")] = 128,
    chunk_attention: Annotated[
        str, typer.Option(help="--mode streaming: each chunk attends to itself in full precision (full, as "
                          "generation does) or as stored (stored, as simulated mode).")
    ] = "full",
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 1,
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Perplexity (and KL divergence, top-1 agreement) of the unquantized cache and of each configuration.

    Example: kvq eval-ppl --dataset wikitext2 --data-dir ../shared/data --max-windows 4 --method kivi2 --method int4
    """
    from . import api
    from .methods import parse_spec

    defaults = _method_defaults(bits=bits, group=group)
    methods = [parse_spec(spec, defaults) for spec in method or []]
    with _progress() as progress:
        result = api.eval_ppl(
            model=model,
            dataset=dataset,
            data_dir=data_dir,
            seqlen=seqlen,
            max_windows=max_windows,
            device=device,
            dtype=dtype,
            batch_size=batch_size,
            artifacts=artifact or [],
            methods=methods,
            mode=mode,
            chunk=chunk,
            chunk_attention=chunk_attention,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            progress=progress_factory(progress),
        )
    if json_out:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    title = (
        f"{result['model']} on {result['dataset']}: {result['windows']} windows x {result['seqlen']} tokens "
        f"({result['mode']}, {result['dtype']}, {result['device']})"
    )
    console.print(render.results_table(title, result["results"]))


@app.command()
@user_errors
def calibrate(
    method: Annotated[
        str, typer.Option("--method", help="kvquant, kivi, int, nf, fp16 (or NAME:key=value,...).")
    ] = "kvquant",
    out: Annotated[
        str, typer.Option("--out", "-o", help="Artifact to write (.safetensors).")
    ] = "kvq-artifact.safetensors",
    model: ModelOpt = "smollm2-135m",
    dataset: DatasetOpt = "wikitext2-valid",
    data_dir: DataDirOpt = None,
    samples: Annotated[int, typer.Option(help="Calibration sequences.")] = 16,
    seqlen: Annotated[int, typer.Option(help="Tokens per calibration sequence.")] = 2048,
    bits: Annotated[int | None, typer.Option(help="Bits per element (kvquant 1-4, kivi 2/4, int 2-8, nf 2-4).")] = None,
    outliers: Annotated[
        float | None, typer.Option(help="kvquant: fraction kept as sparse fp16 outliers (0, 0.001, 0.01).")
    ] = None,
    sink: Annotated[int | None, typer.Option(help="First tokens kept in full precision (kvquant default 1).")] = None,
    group: Annotated[int | None, typer.Option(help="kivi: group size (tokens for keys, channels for values).")] = None,
    residual: Annotated[int | None, typer.Option(help="kivi: newest tokens kept in full precision.")] = None,
    per_channel: Annotated[bool | None, typer.Option("--per-channel/--per-token", help="kvquant: key axis.")] = None,
    pre_rope: Annotated[
        bool | None, typer.Option("--pre-rope/--post-rope", help="kvquant: quantize keys before RoPE.")
    ] = None,
    nuq: Annotated[bool | None, typer.Option("--nuq/--uniform", help="kvquant: k-means codebook or uniform.")] = None,
    fisher: Annotated[
        bool | None, typer.Option("--fisher/--no-fisher", help="kvquant: Fisher-weighted k-means.")
    ] = None,
    qnorm: Annotated[bool | None, typer.Option("--qnorm/--no-qnorm", help="kvquant: Q-Norm of centroids.")] = None,
    seed: Annotated[int, typer.Option(help="Seed for sampling windows and k-means.")] = 0,
    max_tokens: Annotated[int, typer.Option(help="Token vectors kept per layer for codebook fitting.")] = 16384,
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Fit a method's per-layer codebooks and outlier thresholds on sample text; write one artifact.

    Example: kvq calibrate --method kvquant --bits 3 --outliers 0.01 --data-dir ../shared/data --out kvq3.safetensors
    """
    from . import api
    from .methods import parse_spec

    options = _method_defaults(
        bits=bits,
        outliers=outliers,
        sink=sink,
        group=group,
        residual=residual,
        per_channel=per_channel,
        pre_rope=pre_rope,
        nuq=nuq,
        fisher=fisher,
        qnorm=qnorm,
    )
    spec = parse_spec(method, {})
    known = set(spec.config())
    refused = sorted(k for k in options if k not in known)
    if refused:
        raise KvqError(f"method {spec.name} does not take --{refused[0].replace('_', '-')}")
    spec = parse_spec(method + ("," if ":" in method else ":") + ",".join(f"{k}={v}" for k, v in options.items()))
    with _progress() as progress:
        result = api.calibrate(
            spec,
            out,
            model=model,
            dataset=dataset,
            data_dir=data_dir,
            samples=samples,
            seqlen=seqlen,
            seed=seed,
            max_tokens=max_tokens,
            device=device,
            dtype=dtype,
            device_map=device_map,
            trust_remote_code=trust_remote_code,
            progress=progress_factory(progress),
        )
    if json_out:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    cal = result["calibration"]
    say(console, "wrote", "bold", f"{result['artifact']}: {result['name']} for {result['model']} "
        f"({result['layers']} layers, {result['avg_bits']:.2f} avg bits at {seqlen} tokens, {cal['seconds']} s)")


@app.command("estimate-memory")
@user_errors
def estimate_memory(
    model: Annotated[
        str,
        typer.Option(
            "--model", "-m", help="A preset (llama-2-7b, llama-3-8b, mistral-7b, qwen2.5-7b, smollm2-135m, ...) "
            "or a local HF folder, .gguf file or hub id: only its configuration is read."
        ),
    ] = "smollm2-135m",
    context: Annotated[
        str, typer.Option("--context", "-c", help="Tokens per sequence: 131072, 128K, 1M, 10M.")
    ] = "128K",
    batch: Annotated[int, typer.Option(help="Sequences held at once.")] = 1,
    method: Annotated[
        list[str] | None,
        typer.Option("--method", help="A configuration (repeatable): kivi2, int4, kvquant:bits=2,outliers=0.01, ..."),
    ] = None,
    artifact: Annotated[
        list[str] | None, typer.Option("--artifact", "-a", help="A calibrated artifact (repeatable).")
    ] = None,
    weights_dtype: Annotated[str, typer.Option(help="Weights: bf16, fp16, int8 or int4.")] = "bf16",
    gpu: Annotated[
        str | None,
        typer.Option(help="h100-80gb (default), a100-80gb, a100-40gb, h200, l40s, a6000, rtx4090, rtx3090."),
    ] = None,
    budget: Annotated[
        str | None, typer.Option(help="Memory per GPU instead of --gpu: 80GiB (2^30) or 80GB (1e9).")
    ] = None,
    gpus: Annotated[int, typer.Option(help="GPUs of --gpu/--budget each: the layers are split over them (each "
                                      "layer's cache on its GPU); prints which layers go where.")] = 1,
    plot: Annotated[str | None, typer.Option(help="Also write a PNG of memory against context.")] = None,
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Memory of the KV cache (fp16 and each configuration), weights and workspace against a GPU budget.

    Computed from the configuration (no weights are read) with the same bit accounting as evaluation.
    Example: kvq estimate-memory --model llama-2-7b --context 1M --gpu a100-80gb --method kvquant:bits=2,outliers=0.01
    """
    from . import api
    from .methods import parse_spec

    methods = [parse_spec(spec) for spec in method or []]
    result = api.estimate_memory(
        model=model, context=context, batch=batch, methods=methods, artifacts=artifact or [],
        weights_dtype=weights_dtype, gpu=gpu, budget=budget, gpus=gpus, plot=plot, trust_remote_code=trust_remote_code,
    )
    for note in result["notes"]:
        say(err, "kvq: note:", "yellow", note)
    if json_out:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    console.print(render.memory_table(result, weights_dtype, batch, gpus))
    for line in render.placement_lines(result):
        console.print(line, highlight=False)
    if "plot" in result:
        say(console, "wrote", "bold", result["plot"])


@app.command()
@user_errors
def generate(
    model: ModelOpt = "smollm2-135m",
    artifact: Annotated[str | None, typer.Option("--artifact", "-a", help="A calibrated artifact.")] = None,
    method: Annotated[
        str | None,
        typer.Option("--method", help="A tuning-free configuration instead of --artifact: kivi2, int4, fp16, ... "
                     "Neither: the 16-bit baseline (StaticCache with CUDA graphs, else DynamicCache)."),
    ] = None,
    prompt_file: Annotated[str | None, typer.Option("--prompt-file", "-f", help="Prompt text file.")] = None,
    haystack: Annotated[
        bool,
        typer.Option("--haystack", help="A passkey-retrieval prompt (War and Peace filler); the answer is checked."),
    ] = False,
    context: Annotated[
        str | None,
        typer.Option("--context", "-c", help="Prompt length in tokens (8K, 128K, 1M): the file repeated or cut, "
                     "or the haystack's size."),
    ] = None,
    depth: Annotated[
        float | None, typer.Option(help="--haystack: where the pass key sits, 0 (start) to 1 (end); default 0.5.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate (greedy; stops at end of sequence).")] = 32,
    chunk: Annotated[int, typer.Option(help="Prompt tokens per prefill forward pass.")] = 4096,
    seed: Annotated[int, typer.Option(help="Seed of the pass key and haystack (random prompts too).")] = 0,
    filler: Annotated[
        str, typer.Option(help="The haystack's text: war-and-peace, shakespeare, wikitext2 or a text file.")
    ] = "war-and-peace",
    data_dir: DataDirOpt = None,
    kernels: Annotated[
        bool | None, typer.Option("--kernels/--no-kernels", help="Triton decode kernels (default: on CUDA).")
    ] = None,
    temperature: Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy (the default).")] = 0.0,
    top_k: Annotated[int, typer.Option(help="Sample among the k most likely tokens (0 = all).")] = 0,
    top_p: Annotated[float, typer.Option(help="Sample among the most likely tokens up to this probability.")] = 1.0,
    graphs: Annotated[
        bool | None,
        typer.Option("--graphs/--no-graphs", help="Capture the decode step once as a CUDA graph and replay it per "
                     "token (default: on one CUDA device)."),
    ] = None,
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    dtype: Annotated[str, typer.Option("--dtype", help="auto (bfloat16 on CUDA, float32 on CPU), float32, "
                                       "bfloat16 or float16.")] = "auto",
    trust_remote_code: TrustOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Generate from a long prompt through the packed quantized cache, with a memory pre-flight and a summary.

    The prompt is prefilled --chunk tokens at a time (history dequantized block by block, never whole), then
    decoded (greedy, or sampled with --temperature/--top-k/--top-p and --seed), on CUDA one CUDA-graph replay
    per token where the cache allows it; the 16-bit baseline (no --artifact/--method) is then transformers'
    StaticCache under the same engine. The summary gives time to first token, decode tokens/s, how many decode
    layer-steps the Triton kernels served, peak memory, cache bytes and average bits beside estimate-memory's
    prediction. --model random:<preset> (e.g. random:llama-3.2-1b) runs a model of
    that shape with random weights on random token ids.

    Example: kvq generate --method kivi4 --haystack --context 4K --depth 0.25 --data-dir ../shared/data
    """
    from .generate import generate as run_generate
    from .methods import parse_spec

    spec = parse_spec(method) if method else None
    streaming = not json_out
    shown: list[str] = []

    def note_now(note: str) -> None:
        say(err, "kvq: note:", "yellow", note)
        shown.append(note)

    with _progress() as progress:
        result = run_generate(
            model=model, artifact=artifact, method=spec, prompt_file=prompt_file, haystack=haystack,
            context=context, depth=depth, max_new_tokens=max_new_tokens, chunk=chunk, seed=seed, device=device,
            dtype=dtype, data_dir=data_dir, filler=filler, use_kernels=kernels, device_map=device_map,
            temperature=temperature, top_k=top_k, top_p=top_p, graphs=graphs, trust_remote_code=trust_remote_code,
            progress=progress_factory(progress, stop_when_done=True),
            on_text=(lambda piece: console.print(piece, end="", highlight=False, markup=False)) if streaming
            else (lambda piece: None),
            on_note=note_now,
        )
    for note in result["notes"]:
        if note not in shown:
            say(err, "kvq: note:", "yellow", note)
    if json_out:
        sys.stdout.write(json.dumps(result, indent=2) + "\n")
        return
    console.print()
    console.print(render.generation_table(result))


@app.command("methods")
@user_errors
def methods(json_out: JsonOpt = False) -> None:
    """List the quantization methods, their bit widths and options (what --method and calibrate accept)."""
    from . import api

    rows = api.list_methods()
    if json_out:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
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
