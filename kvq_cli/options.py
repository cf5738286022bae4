"""The option vocabulary every command shares, defined once: ``calibrate``, ``eval-ppl``, ``generate`` and
``estimate-memory`` spell, type and explain ``--method``, ``--bits``, ``--batch``, ``--chunk``, ``--dtype``... the
same way. Imports nothing heavy (torch, transformers): ``kvq --help`` and option mistakes answer at once."""

from __future__ import annotations

import functools
import inspect
from typing import Annotated, Any

import typer
from typer.core import TyperGroup, TyperOption

from .errors import KvqError

#: Old spellings still accepted (hidden from --help, so scripts keep working): old -> new.
ALIASES = {"--batch-size": "--batch", "--weights-dtype": "--dtype"}


def rewrite_aliases(args: list[str]) -> list[str]:
    """``args`` with every old option spelling (``--batch-size 4``, ``--batch-size=4``) in its new one; values and
    everything after ``--`` are left alone."""
    out, rest = [], False
    for arg in args:
        name, eq, value = arg.partition("=")
        if not rest and name in ALIASES:
            arg = ALIASES[name] + eq + value
        rest = rest or arg == "--"
        out.append(arg)
    return out


class Group(TyperGroup):
    """The ``kvq`` command group: old option spellings rewritten before parsing."""

    def parse_args(self, ctx, args: list[str]) -> list[str]:
        return super().parse_args(ctx, rewrite_aliases(list(args)))


def _flags_without_placeholder() -> None:
    """typer prints ``<bool>`` beside every on/off flag (``--json <bool>``): a flag takes no value, so show none.
    (Only typer versions with that hook print the placeholder; older ones are left as they are.)"""
    original = getattr(TyperOption, "display_type_rich", None)
    if original is None:
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else original(self, ctx)

    TyperOption.display_type_rich = display_type_rich


_flags_without_placeholder()


def _help_width() -> None:
    """--help written to a pipe or file: 120 columns, not 80 (``$TERMINAL_WIDTH`` or ``$COLUMNS`` win)."""
    import os
    import sys

    from typer import rich_utils

    if rich_utils.MAX_WIDTH is None and not os.environ.get("COLUMNS") and not sys.stdout.isatty():
        rich_utils.MAX_WIDTH = 120


_help_width()

# --- what to run ---------------------------------------------------------------------------------------------------
Model = Annotated[str, typer.Option(
    "--model", "-m", metavar="MODEL",
    help="A built-in alias (smollm2-135m: SmolLM2-135M-Instruct, dequantized from a Q4_1 GGUF; gemma3-270m: "
         "Gemma-3-270M from a Q4_K_M GGUF), a local Hugging Face folder, a .gguf file, or a hub id.")]
Method = Annotated[list[str] | None, typer.Option(
    "--method", metavar="SPEC",
    help="A configuration, repeatable: NAME, NAMEbits or NAME:key=value,... e.g. kivi2, int4, nf:bits=3, "
         "kivi:bits=4,group=64, kvquant:bits=2,outliers=1%, cq:channels=8,bits=8, pq, turbo3. Names: kvquant, "
         "kvquant-rot, kivi, int, nf, fp16, cq, pq, turbo (`kvq methods` lists bits and options).")]
Artifact = Annotated[list[str] | None, typer.Option(
    "--artifact", "-a", metavar="FILE", help="A calibrated artifact from `kvq calibrate` (repeatable).")]

# --- defaults for every --method entry that does not set them --------------------------------------------------------
_PANEL = "Defaults for each --method that has the option and does not set it (refused when none has it)"
Bits = Annotated[int | None, typer.Option(
    rich_help_panel=_PANEL, metavar="N",
    help="Bit width: kvquant 1-4, kivi 2/4, int 2/3/4/8, nf 2-4, turbo 1-4; cq/pq: bits per code.")]
Group_ = Annotated[int | None, typer.Option(
    "--group", rich_help_panel=_PANEL, metavar="N",
    help="kivi: group size (tokens for keys, channels for values; default 32).")]
Residual = Annotated[int | None, typer.Option(
    rich_help_panel=_PANEL, metavar="N",
    help="Newest tokens kept in 16 bits, the residual window (kivi default 128, pq 128).")]
Outliers = Annotated[float | None, typer.Option(
    rich_help_panel=_PANEL, metavar="F",
    help="Fraction kept as sparse fp16 outliers: 0.01 = 1% (kvquant, cq, pq; default 0).")]
OutliersOrAuto = Annotated[str | None, typer.Option(
    rich_help_panel=_PANEL, metavar="F|auto",
    help="Fraction kept as sparse fp16 outliers: 0.01 = 1% (kvquant, cq, pq; default 0). auto, with --avg-bits "
         "(kvquant, kvquant-rot; or outliers=auto in a --method spec): try 0, 0.5% and 1% and keep the fraction "
         "whose widths have the least error within the budget; the artifact records each one's error.")]
Sink = Annotated[int | None, typer.Option(
    rich_help_panel=_PANEL, metavar="N",
    help="First tokens kept in 16 bits, the attention sink (kvquant and cq default 1).")]

AvgBits = Annotated[float | None, typer.Option(
    "--avg-bits", metavar="B",
    help="kvquant, kvquant-rot: choose key and value widths 1-4 per layer to minimize the Fisher-weighted error "
         "within B average bits (counted as everywhere in kvq, overheads included, at --seqlen tokens); the artifact "
         "records them.")]

# --- data -----------------------------------------------------------------------------------------------------------
DATASETS = "wikitext2 (test split), wikitext2-valid, shakespeare, war-and-peace, pg19, c4, or a path to a text file"
Dataset = Annotated[str, typer.Option("--dataset", "-d", metavar="NAME", help=DATASETS + ".")]
Datasets = Annotated[list[str] | None, typer.Option(
    "--dataset", "-d", metavar="NAME", help=DATASETS + "; repeat it for several corpora in one table "
    "[default: wikitext2].")]
DataDir = Annotated[str | None, typer.Option(
    "--data-dir", metavar="DIR",
    help="Folder with local corpus copies (default: $KVQ_DATA_DIR), looked at before the hub; offline "
         "(HF_HUB_OFFLINE=1) a corpus missing there is refused at once.")]
Context = Annotated[str, typer.Option(
    "--context", "-c", metavar="TOKENS", help="Tokens per sequence: 131072, 128K, 1M (K = 1024).")]

# --- how to run -----------------------------------------------------------------------------------------------------
Batch = Annotated[int, typer.Option("--batch", metavar="N", help="Sequences processed at once.")]
CHUNK_WHY = ("Defaults differ on purpose: eval-ppl --mode streaming uses 128, so most tokens attend to the "
             "quantized history as in decoding (a chunk attends to itself in full precision); generate's prefill and "
             "estimate-memory's allowance use 4096, a fast prefill whose activations stay small.")
Device = Annotated[str, typer.Option(metavar="DEV", help="auto (cuda when present, else cpu), cpu or cuda[:N].")]
DeviceMap = Annotated[str | None, typer.Option(
    "--device-map", metavar="MAP",
    help="Spread the layers over all visible GPUs: kvq (even blocks of layers, as estimate-memory --gpus plans) or "
         "accelerate's auto, balanced, sequential; each layer's cache stays on its layer's GPU.")]
Dtype = Annotated[str, typer.Option(
    metavar="DTYPE", help="Model dtype: auto (float32 for exact reference numbers; generate: bfloat16 on CUDA), "
    "float32/fp32, bfloat16/bf16 or float16/fp16.")]
Seed = Annotated[int, typer.Option(metavar="N", help="Seed of every random choice (windows, k-means, prompts).")]
Trust = Annotated[bool, typer.Option(
    "--trust-remote-code", help="Run Python code that comes with the model (auto_map); off: such a model is "
    "refused. Only for a model you trust.")]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout instead of tables.")]


def chunk(help_first: str):
    """``--chunk``, with the command's own first sentence and the shared reason the defaults differ."""
    return Annotated[int, typer.Option("--chunk", metavar="TOKENS", help=f"{help_first} {CHUNK_WHY}")]


_DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16", "half": "float16"}


def model_dtype(text: str) -> str:
    """``--dtype`` of a command that runs a model, as torch names it (``bf16`` -> ``bfloat16``)."""
    if text.lower() not in _DTYPES:
        raise KvqError(f"--dtype must be auto, float32 (fp32), bfloat16 (bf16) or float16 (fp16), not {text!r}")
    return _DTYPES[text.lower()]


def weights_dtype(text: str) -> str:
    """estimate-memory's ``--dtype`` (the weights): ``bf16``, ``fp16``, ``fp32``, ``int8``, ``int4`` (or torch's
    names)."""
    short = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32"}.get(text.lower(), text.lower())
    if short not in ("bf16", "fp16", "fp32", "int8", "int4"):
        raise KvqError(f"--dtype (--weights-dtype) of the weights must be bf16, fp16, fp32, int8 or int4, not {text!r}")
    return short


#: The default-setting flags every command that takes --method has (``with_method_defaults``).
METHOD_DEFAULTS = {"bits": (Bits, None), "group": (Group_, None), "residual": (Residual, None),
                   "outliers": (Outliers, None), "sink": (Sink, None)}
#: calibrate's: ``--outliers`` also takes ``auto`` (``calibration_methods``).
CALIBRATE_DEFAULTS = {**METHOD_DEFAULTS, "outliers": (OutliersOrAuto, None)}
#: How a command that runs a model places it (``runs_model``).
MODEL_RUN = {"device": (Device, "auto"), "device_map": (DeviceMap, None), "dtype": (Dtype, "auto"),
             "trust_remote_code": (Trust, False)}


def _adds(options: dict[str, tuple[Any, Any]], into: str, after: str | None = None, given_only: bool = False):
    """A decorator giving a command the parameters ``options`` (name -> (annotation, default)), placed after
    ``after`` (else last); the command receives them as one dict ``into`` (``given_only``: those not None)."""

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        params = [p for p in sig.parameters.values() if p.name != into]
        at = next(i for i, p in enumerate(params) if p.name == after) + 1 if after else len(params)
        params[at:at] = [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d, annotation=a)
                         for k, (a, d) in options.items()]

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            values = {k: kwargs.pop(k, options[k][1]) for k in options}
            return fn(*args, **{into: default_options(**values) if given_only else values}, **kwargs)

        wrapper.__signature__ = sig.replace(parameters=params)
        wrapper.__annotations__ = {p.name: p.annotation for p in params}
        return wrapper

    return decorate


#: ``--bits``, ``--group``, ``--residual``, ``--outliers``, ``--sink`` after ``--method``; the command gets those
#: given as ``defaults`` (``{"bits": 3}``): declared once here, not five parameters in every command.
with_method_defaults = _adds(METHOD_DEFAULTS, "defaults", after="method", given_only=True)
#: The same for calibrate, whose ``--outliers`` may be ``auto`` (a text then).
with_calibrate_defaults = _adds(CALIBRATE_DEFAULTS, "defaults", after="method", given_only=True)
#: ``--device``, ``--device-map``, ``--dtype``, ``--trust-remote-code``; the command gets them as ``run``.
runs_model = _adds(MODEL_RUN, "run")


def check_corpora(names: list[str], data_dir: str | None) -> None:
    """Every corpus can be read (a local file, or the hub when online and reachable): said before torch loads."""
    from .data import locate

    for name in names:
        locate(name, data_dir)


def check_run(model: str, run: dict[str, Any]) -> None:
    """``--device`` and ``--device-map`` are names kvq knows, and a local model whose config.json shows that kvq
    cannot run it is refused (``models.precheck``): said before torch loads."""
    from .api import check_device
    from .models import check_device_map, precheck

    check_device(run["device"])
    if run["device_map"] is not None:
        check_device_map(run["device_map"])
    precheck(model, run["trust_remote_code"])


def default_options(**options: Any) -> dict[str, Any]:
    """The default-setting flags that were given (``--bits 3`` -> ``{"bits": 3}``)."""
    return {k: v for k, v in options.items() if v is not None}


def methods(specs: list[str] | None, defaults: dict[str, Any], fallback: list[str] | None = None,
            tuning_free: bool = False) -> list:
    """Every ``--method`` spec built (``methods.parse_spec``) with ``defaults`` filled in where a method has the
    option. A default that no method takes, or defaults without any --method, are refused; ``tuning_free``:
    a method that needs calibration is refused (it needs ``--artifact``). Checked before any model loads."""
    from .methods import get_method_class, parse_spec

    specs = list(specs or fallback or [])
    if defaults and not specs:
        raise KvqError(f"--{_flag(next(iter(defaults)))} sets a default for --method entries: give --method too")
    built = [parse_spec(s, defaults) for s in specs]
    for key in defaults:
        _check_taken(built, key)
    for m in built:
        if tuning_free and get_method_class(m.name).needs_calibration:
            raise KvqError(f"method {m.name} needs calibration: run `kvq calibrate --method {m.name} ...` and pass "
                           "the artifact with --artifact")
    return built


def _check_taken(built: list, key: str) -> None:
    """A default ``--KEY`` some method of ``built`` has; ``KvqError`` otherwise."""
    if not any(key in m.config() for m in built):
        names = list(dict.fromkeys(m.name for m in built))
        which = f"method {names[0]} does" if len(names) == 1 else f"methods {', '.join(names)} do"
        raise KvqError(f"{which} not take --{_flag(key)} (`kvq methods` lists each method's options)")


#: ``--outliers auto``, ``outliers=auto``: the outlier fraction searched under ``--avg-bits``.
AUTO = "auto"


def calibration_methods(specs: list[str] | None, defaults: dict[str, Any], fallback: list[str]) -> list[tuple]:
    """calibrate's ``--method`` entries, ``methods`` where the outlier fraction may be ``auto`` (``--outliers auto``
    for every spec that does not set outliers, or ``outliers=auto`` in a spec): ``(method, whether its outlier
    fraction is searched)`` each (a searched method is built at its default fraction)."""
    given = defaults.get("outliers")
    auto_default = isinstance(given, str) and given.strip().lower() == AUTO
    defaults = {**defaults, "outliers": None if auto_default else _fraction(given)}
    split = [_without_auto(s) for s in list(specs or fallback)]
    built = methods([s for s, _, _ in split], default_options(**defaults))
    if auto_default:
        _check_taken(built, "outliers")
    return [(m, asked or (auto_default and not sets)) for m, (_, asked, sets) in zip(built, split, strict=True)]


def _fraction(text: str | None) -> float | None:
    """``--outliers`` as a number: ``0.01`` or ``1%`` (None stays None)."""
    from .methods.registry import parse_fraction

    if text is None:
        return None
    try:
        return parse_fraction(text)
    except ValueError:
        raise KvqError(f"--outliers is a fraction (0.01 or 1%) or auto, not {text!r}") from None


def _without_auto(spec: str) -> tuple[str, bool, bool]:
    """``spec`` without its ``outliers=auto`` item, whether it had one, and whether it sets outliers at all
    (given twice, the spec is left for ``parse_spec`` to refuse)."""
    name, _, rest = spec.partition(":")
    items = [part.strip() for part in rest.split(",") if part.strip()]
    ours = [i for i in items if i.partition("=")[0].strip().replace("-", "_") == "outliers"]
    if len(ours) != 1 or ours[0].partition("=")[2].strip().lower() != AUTO:
        return spec, False, bool(ours)
    items.remove(ours[0])
    return name + (":" + ",".join(items) if items else ""), True, True


def _flag(key: str) -> str:
    return key.replace("_", "-")
