"""The validation layer of kvq artifacts: metadata schema, tensor headers, tensor values and the checksum.

Every check names what is wrong in one ``KvqError`` line. The order is the reader's (``artifact.load``):

1. ``check_metadata``: the JSON's types and ranges (schema version, method options, model fingerprint,
   layer count, checksum field), before any tensor is read;
2. ``check_headers``: every tensor's name, dtype and shape against what the method's ``fit`` writes for the
   fingerprint's geometry (``KVMethod.state_shapes``), from the safetensors header alone;
3. ``digest`` (compared with the metadata's ``sha256``): the canonical metadata JSON and every tensor's
   name, dtype, shape and bytes, so any changed bit of either is refused;
4. ``check_values``: finite, within fp16's range (the runtime stores states in fp16), and what the method
   itself requires (``KVMethod.check_state``: sorted codebooks, ``key_lo <= key_hi``).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING, Any

from .errors import KvqError
from .hf_config import check_geometry
from .lazy import torch
from .methods import KVMethod, method_from_config

if TYPE_CHECKING:
    from torch import Tensor

SCHEMA_VERSION = 2
FINGERPRINT_KEYS = ("architecture", "layers", "kv_heads", "head_dim", "q_heads", "rope_theta")
_TOP_KEYS = {"schema_version", "kvq_version", "method", "model", "calibration", "layers", "sha256"}
_FP16_MAX = 65504.0


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_metadata(raw: str) -> dict[str, Any]:
    """The ``kvq`` metadata entry as a dict (no NaN/Infinity literals, bounded nesting)."""
    try:
        meta = json.loads(raw, parse_constant=_refuse_constant)
    except (ValueError, RecursionError):
        raise KvqError("corrupt metadata (not JSON)") from None
    if not isinstance(meta, dict):
        raise KvqError("corrupt metadata (not a JSON object)")
    return meta


def check_metadata(meta: dict[str, Any]) -> KVMethod:
    """Types and ranges of every metadata field; returns the method it describes."""
    version = meta.get("schema_version")
    if type(version) is int and version == 1:
        raise KvqError("schema version 1 (written before artifacts carried a checksum); re-run `kvq calibrate`")
    if type(version) is not int or version != SCHEMA_VERSION:
        raise KvqError(f"schema version {version!r}; this kvq reads version {SCHEMA_VERSION}")
    unknown = sorted(set(meta) - _TOP_KEYS)
    missing = sorted(_TOP_KEYS - set(meta))
    if unknown or missing:
        raise KvqError(f"metadata has {'unknown' if unknown else 'no'} field(s) {', '.join(unknown or missing)}")
    if not isinstance(meta["kvq_version"], str) or not isinstance(meta["calibration"], dict):
        raise KvqError("metadata fields kvq_version (text) or calibration (object) have the wrong type")
    sha = meta["sha256"]
    if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
        raise KvqError("metadata field sha256 is not 64 hexadecimal digits")
    model = meta["model"]
    if not isinstance(model, dict) or set(model) != set(FINGERPRINT_KEYS):
        raise KvqError(f"metadata field model must hold exactly {', '.join(FINGERPRINT_KEYS)}")
    if not isinstance(model["architecture"], str) or not 0 < len(model["architecture"]) <= 200:
        raise KvqError("metadata field model.architecture is not a name")
    check_geometry(model["layers"], model["kv_heads"], model["head_dim"], model["q_heads"], model["rope_theta"],
                   where="metadata field model")
    if type(meta["layers"]) is not int or meta["layers"] != model["layers"]:
        raise KvqError(f"metadata says {meta['layers']!r} layers for a model of {model['layers']}")
    try:
        return method_from_config(meta["method"])
    except KvqError as exc:
        raise KvqError(f"metadata field method: {exc}") from None


def expected_shapes(method: KVMethod, model: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the artifact and its shape, from the method and the fingerprint's geometry."""
    layers = _layer_methods(method, model["layers"])
    per_layer = [m.state_shapes(model["kv_heads"], model["head_dim"]) for m in layers]
    if per_layer[0] and not method.needs_calibration:
        raise KvqError(f"method {method.name} has no state")  # a bug in a method, not in the file
    return {f"layers.{i}.{name}": shape for i, shapes in enumerate(per_layer) for name, shape in shapes.items()}


def _layer_methods(method: KVMethod, layers: int) -> list[KVMethod]:
    """Each layer's configuration (``for_layer``); a method with per-layer widths for another layer count is refused."""
    widths = getattr(method, "widths", None)
    if widths is not None and widths() and len(widths()) != layers:
        raise KvqError(f"metadata field method: layer_bits gives {len(widths())} layers for a model of {layers}")
    return [method.for_layer(i) for i in range(layers)]


def check_names(names: list[str], expected: dict[str, tuple[int, ...]]) -> None:
    """Every tensor name is one the method writes (checked before any tensor header is read)."""
    for name in names:
        if name not in expected:
            raise KvqError(f"unexpected tensor {name[:80]!r}")


def check_headers(headers: dict[str, tuple[str, list[int]]], expected: dict[str, tuple[int, ...]]) -> None:
    """``headers``: name -> (safetensors dtype, shape) as the file declares them, before any tensor is read."""
    for name, (dtype, shape) in sorted(headers.items()):
        if name not in expected:
            raise KvqError(f"unexpected tensor {name[:80]!r}")
        if dtype != "F32":
            raise KvqError(f"tensor {name} is {dtype}, not F32")
        if tuple(shape) != expected[name]:
            raise KvqError(f"tensor {name} has shape {tuple(shape)}, not {expected[name]}")
    missing = sorted(set(expected) - set(headers))
    if missing:
        raise KvqError(f"tensor {missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if missing[1:] else ""))


def canonical(meta: dict[str, Any]) -> bytes:
    """The metadata without its checksum, as canonical JSON bytes."""
    body = {k: v for k, v in meta.items() if k != "sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def digest(meta: dict[str, Any], tensors: dict[str, Tensor]) -> str:
    """sha256 of ``canonical(meta)`` and, in name order, each tensor's name, dtype, shape and bytes."""
    h = hashlib.sha256(canonical(meta))
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"\0{name}\0{str(t.dtype)}\0{list(t.shape)}\0".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_values(method: KVMethod, states: list[dict[str, Tensor]]) -> None:
    """Finite, within fp16's range, and what the method requires of a fitted state."""
    for i, state in enumerate(states):
        for name, t in state.items():
            if not torch.isfinite(t).all():
                raise KvqError(f"tensor layers.{i}.{name} has NaN or infinite entries")
            if t.numel() and t.abs().max().item() > _FP16_MAX:
                raise KvqError(f"tensor layers.{i}.{name} has entries beyond fp16's range")
        why = method.for_layer(i).check_state(state) if state else None
        if why:
            raise KvqError(f"layer {i}: {why}")
