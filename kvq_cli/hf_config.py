"""A model's configuration without torch or transformers: the KV geometry kvq needs from it (``geometry_from_config``),
and a local ``config.json`` read as plain JSON (``json_config``), so that ``kvq estimate-memory`` and the refusal of a
model kvq cannot run answer at once (transformers' configuration classes import torch: seconds on a small machine).

The JSON is read exactly as transformers reads it only for the model types in ``FAMILIES``: their configuration
classes fill in keys a file leaves out (KV heads, ``head_dim``, the sliding window, RoPE theta, ``layer_types``) and
``json_config`` fills them in the same way (tests compare the two for every family). A file of any other model type
is its keys alone: it proves only what it says (``models.check_supported(exact=False)``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import KvqError


@dataclass(frozen=True)
class KVGeometry:
    """Shapes of a model's KV cache."""

    layers: int
    kv_heads: int
    head_dim: int
    q_heads: int
    rope_theta: float | dict[str, float]  # one theta, or one per layer type (Gemma 3: sliding / full attention)
    max_positions: int | None
    architecture: str
    #: each layer's sliding window (None: global attention); None: every layer global
    windows: tuple[int | None, ...] | None = None


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def rope_thetas(cfg) -> float | dict[str, float] | None:
    """The config's RoPE theta: one number, or ``{layer type: theta}`` where ``rope_parameters`` is nested by layer
    type (Gemma 3); None where the config names no RoPE at all."""
    rope = getattr(cfg, "rope_parameters", None)
    if isinstance(rope, dict) and rope and all(isinstance(v, dict) for v in rope.values()):
        thetas = {k: v.get("rope_theta") for k, v in rope.items()}
        return None if any(t is None for t in thetas.values()) else thetas
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    theta = theta or getattr(cfg, "rope_theta", None)
    local = getattr(cfg, "rope_local_base_freq", None)  # Gemma 3 configs before nested rope_parameters
    if theta is not None and local is not None and local != theta:
        return {"full_attention": theta, "sliding_attention": local}
    return theta


def layer_windows(config) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: global attention), as the model's attention applies it: ``layer_types``
    where the config has them, else ``sliding_window`` on every layer (Mistral), unless ``use_sliding_window`` is
    off (Qwen2/3)."""
    cfg = text_config(config)
    window = getattr(cfg, "sliding_window", None)
    if getattr(cfg, "use_sliding_window", True) is False or isinstance(window, bool) or not isinstance(window, int):
        window = None
    types = getattr(cfg, "layer_types", None)
    if types and len(types) == cfg.num_hidden_layers:
        return tuple(window if t == "sliding_attention" else None for t in types)
    return (window,) * cfg.num_hidden_layers


def layer_rope_key(config, layer: int) -> str | None:
    """The layer type whose RoPE ``layer`` uses when thetas differ per type (``rope_thetas``), else None."""
    cfg = text_config(config)
    types = getattr(cfg, "layer_types", None)
    return types[layer] if types and isinstance(rope_thetas(cfg), dict) else None


def geometry_from_config(config) -> KVGeometry:
    """KV geometry from a config alone (no weights)."""
    cfg = text_config(config)
    heads = cfg.num_attention_heads
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise KvqError(f"the model's config: num_attention_heads must be a positive integer, not {heads!r}")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    theta = rope_thetas(cfg) or 10000.0
    if isinstance(theta, dict):
        theta = {k: float(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for k, v in theta.items()}
    arch = (getattr(cfg, "architectures", None) or [cfg.model_type])[0]
    positions = getattr(cfg, "max_position_embeddings", None)
    check_geometry(cfg.num_hidden_layers, kv_heads, head_dim, heads, theta, positions, where="the model's config")
    windows = layer_windows(cfg)
    return KVGeometry(cfg.num_hidden_layers, kv_heads, head_dim, heads, theta if isinstance(theta, dict)
                      else float(theta), positions, arch, windows if any(w is not None for w in windows) else None)


#: Largest sizes a configuration may claim (beyond any released model, small enough to allocate per layer).
GEOMETRY_LIMITS = {"layers": 4096, "kv_heads": 4096, "head_dim": 8192, "q_heads": 4096}


def check_geometry(layers, kv_heads, head_dim, q_heads, rope_theta, max_positions=None, where="config") -> None:
    """``KvqError`` unless every size is an integer in ``1..GEOMETRY_LIMITS``, the query heads a multiple of the KV
    heads, ``rope_theta`` a positive finite number (or ``{layer type: theta}``) and ``max_positions`` None or a
    positive integer."""
    sizes = {"layers": layers, "kv_heads": kv_heads, "head_dim": head_dim, "q_heads": q_heads}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= GEOMETRY_LIMITS[name]:
            raise KvqError(f"{where}: {name} must be an integer in 1..{GEOMETRY_LIMITS[name]}, not {value!r}")
    if q_heads % kv_heads:
        raise KvqError(f"{where}: {q_heads} query heads are not a multiple of {kv_heads} KV heads")
    thetas = rope_theta.values() if isinstance(rope_theta, dict) and 0 < len(rope_theta) <= 16 else [rope_theta]
    for theta in thetas:
        if isinstance(theta, bool) or not isinstance(theta, int | float) or not 0 < theta < float("inf"):
            raise KvqError(f"{where}: rope_theta must be a positive number (or one per layer type), not "
                           f"{str(rope_theta)[:80]!r}")
    if isinstance(rope_theta, dict) and not all(isinstance(k, str) and 0 < len(k) <= 64 for k in rope_theta):
        raise KvqError(f"{where}: rope_theta's layer types must be names")
    if max_positions is not None and (isinstance(max_positions, bool) or not isinstance(max_positions, int)
                                      or max_positions < 1):
        raise KvqError(f"{where}: max_position_embeddings must be a positive integer, not {max_positions!r}")


# ---- config.json as JSON -------------------------------------------------------------------------------------------
#: Model types whose config.json ``json_config`` reads as transformers does, with the defaults their configuration
#: classes give the keys kvq reads when a file leaves them out (beyond the defaults ``geometry_from_config`` and
#: ``presets.shape_from_config`` apply to every config: KV heads = heads, head_dim = hidden / heads, untied embeddings).
FAMILIES: dict[str, dict[str, Any]] = {
    "llama": {},
    "phi3": {},
    "mistral": {"num_key_value_heads": 8, "sliding_window": 4096},
    "qwen2": {"num_key_value_heads": 32, "sliding_window": 4096, "use_sliding_window": False, "max_window_layers": 28},
    "qwen3": {"num_key_value_heads": 32, "head_dim": 128, "sliding_window": 4096, "use_sliding_window": False,
              "max_window_layers": 28},
    "gemma": {"num_key_value_heads": 16, "head_dim": 256, "tie_word_embeddings": True},
    "gemma2": {"num_key_value_heads": 4, "head_dim": 256, "tie_word_embeddings": True, "sliding_window": 4096},
    "gemma3_text": {"num_key_value_heads": 4, "head_dim": 256, "tie_word_embeddings": True, "sliding_window": 4096},
}
#: Keys a file must state to be read as JSON (left out, transformers would describe its default model instead).
REQUIRED = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size",
            "max_position_embeddings")
#: RoPE theta where a file names none (Gemma 3: one for global layers, one for sliding-window layers).
DEFAULT_THETA = 10000.0
GEMMA3_THETAS = {"full_attention": 1e6, "sliding_attention": 1e4}


class JsonConfig:
    """A config.json's keys as attributes, as a transformers configuration offers them (``get_text_config``: the
    nested ``text_config`` where there is one). A key the file does not have is an ``AttributeError``."""

    def __init__(self, keys: dict[str, Any]):
        self._keys = keys

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["_keys"][name]
        except KeyError:
            raise AttributeError(name) from None

    def get_text_config(self) -> JsonConfig:
        inner = self._keys.get("text_config")
        return JsonConfig(inner) if isinstance(inner, dict) else self

    def to_dict(self) -> dict[str, Any]:
        return dict(self._keys)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None where it cannot be read as one (transformers then says why)."""
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return raw if isinstance(raw, dict) else None


def json_config(raw: dict[str, Any]) -> tuple[JsonConfig, bool]:
    """``raw`` (a config.json's object) as a configuration, and whether it is what transformers reads: a text model
    of a type in ``FAMILIES`` that states the ``REQUIRED`` keys, with the family's defaults and derived keys (layer
    types, RoPE parameters) filled in. Otherwise the file's keys alone, and False."""
    kind = raw.get("model_type")
    if kind not in FAMILIES or "text_config" in raw or not all(_size(raw.get(k)) for k in REQUIRED):
        return JsonConfig(raw), False
    try:
        derived = _derived({**copy.deepcopy(FAMILIES[kind]), **copy.deepcopy(raw)}, kind)
    except (TypeError, ValueError, ArithmeticError, AttributeError, RecursionError):
        derived = None
    return (JsonConfig(raw), False) if derived is None else (JsonConfig(derived), True)


def mentions_rope(raw: Any) -> bool:
    """Whether any key of a config.json object, at any depth, names RoPE (``rope_theta``, ``rotary_dim``, ...)."""
    stack = [raw]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if any("rope" in str(k).lower() or "rotary" in str(k).lower() for k in item):
                return True
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1 << 24


def _derived(keys: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """What the family's configuration class computes from the keys: layer types and standard RoPE parameters."""
    layers = keys["num_hidden_layers"]
    if layers > GEOMETRY_LIMITS["layers"]:
        return None
    if kind in ("qwen2", "qwen3"):
        if not keys["use_sliding_window"]:
            keys["sliding_window"] = None
        if keys.get("layer_types") is None:
            keys["layer_types"] = ["sliding_attention" if keys["sliding_window"] is not None
                                   and i >= keys["max_window_layers"] else "full_attention" for i in range(layers)]
    if kind in ("gemma2", "gemma3_text") and keys.get("layer_types") is None:
        if keys.get("use_bidirectional_attention"):
            return None  # transformers halves the window of these: left to it
        pattern = 2 if kind == "gemma2" else keys.get("sliding_window_pattern", 6)
        keys["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    rope = _rope_parameters(keys, kind)
    if rope is None:
        return None
    for key in ("rope_scaling", "rope_theta", "rope_local_base_freq"):
        keys.pop(key, None)
    return {**keys, "rope_parameters": rope}


def _rope_parameters(keys: dict[str, Any], kind: str) -> dict[str, Any] | None:
    """``rope_parameters`` as transformers standardizes them: the legacy ``rope_scaling`` wins, each (per layer type)
    dict gets the file's ``rope_theta`` or the default; Gemma 3 nests one per layer type."""
    scaling = keys.get("rope_scaling")
    params = keys.get("rope_parameters")
    if (scaling is not None and not isinstance(scaling, dict)) or (params is not None and not isinstance(params, dict)):
        return None
    if kind == "gemma3_text":
        params = params or {"sliding_attention": {}, "full_attention": {}}
        full, sliding = params.get("full_attention") or {}, params.get("sliding_attention") or {}
        if not isinstance(full, dict) or not isinstance(sliding, dict):
            return None
        full = {**full, **(scaling or {})}
        full.setdefault("rope_theta", keys.get("rope_theta", GEMMA3_THETAS["full_attention"]))
        sliding.setdefault("rope_theta", keys.get("rope_local_base_freq", GEMMA3_THETAS["sliding_attention"]))
        return {**params, "full_attention": full, "sliding_attention": sliding}
    params = dict(scaling or params or {})
    nested = params and all(isinstance(v, dict) for v in params.values())
    for part in params.values() if nested else [params]:
        part.setdefault("rope_theta", keys.get("rope_theta", DEFAULT_THETA))
    return params
