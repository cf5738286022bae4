"""The only reader and writer of kvq artifacts (safetensors: per-layer tensors plus JSON metadata).

Layout: tensors ``layers.{i}.{name}`` (float32), and one metadata entry ``kvq`` holding JSON::

    {"schema_version": 1, "kvq_version": ..., "method": {...full config...},
     "model": {"architecture", "layers", "kv_heads", "head_dim", "q_heads", "rope_theta"},
     "calibration": {"dataset", "samples", "seqlen", "seed", ...}}

Tuning-free methods get an artifact too (configuration only, no tensors). Files are written under a
temporary name and renamed, so an interrupted write leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .errors import KvqError
from .hf_attention import KVGeometry
from .methods import KVMethod, method_from_config
from .methods.base import State

SCHEMA_VERSION = 1
_FINGERPRINT_KEYS = ("architecture", "layers", "kv_heads", "head_dim", "q_heads", "rope_theta")


def fingerprint(geom: KVGeometry) -> dict[str, Any]:
    """What must match between an artifact and the model it is used with."""
    return {k: v for k, v in asdict(geom).items() if k in _FINGERPRINT_KEYS}


@dataclass
class Artifact:
    """A calibrated (or configuration-only) method for one model."""

    method: KVMethod
    states: list[State]
    model: dict[str, Any]
    calibration: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def state_bits(self) -> int:
        """Bits of every layer's state together (codebooks, thresholds)."""
        return sum(self.method.state_bits(s) for s in self.states)

    def check_model(self, geom: KVGeometry) -> None:
        """Refuse use with a model whose KV geometry differs from the one calibrated."""
        mine, theirs = self.model, fingerprint(geom)
        diff = [f"{k} {mine.get(k)} vs {theirs[k]}" for k in _FINGERPRINT_KEYS if mine.get(k) != theirs[k]]
        if diff:
            where = self.path or "artifact"
            raise KvqError(f"{where} was made for another model ({'; '.join(diff)})")


def save(artifact: Artifact, path: str | os.PathLike) -> Path:
    """Write atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    tensors = {
        f"layers.{i}.{name}": t.detach().to("cpu", torch.float32).contiguous()
        for i, state in enumerate(artifact.states)
        for name, t in state.items()
    }
    meta = {
        "schema_version": SCHEMA_VERSION,
        "kvq_version": __version__,
        "method": artifact.method.config(),
        "model": artifact.model,
        "calibration": artifact.calibration,
        "layers": len(artifact.states),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={"kvq": json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def load(path: str | os.PathLike) -> Artifact:
    """Read and validate an artifact; every problem is one ``KvqError`` line."""
    path = Path(path)
    if not path.is_file():
        raise KvqError(f"artifact {path} not found")
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("kvq")
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no items()
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise KvqError(f"artifact {path} is corrupt or truncated ({str(exc).splitlines()[0][:120]})") from None
    if raw is None:
        raise KvqError(f"{path} is a safetensors file but not a kvq artifact (no 'kvq' metadata)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise KvqError(f"artifact {path} has corrupt metadata") from None
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise KvqError(f"artifact {path} has schema version {version}; this kvq reads version {SCHEMA_VERSION}")
    method = method_from_config(meta["method"])
    n = int(meta.get("layers", 0))
    states: list[State] = [{} for _ in range(n)]
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        if not 0 <= int(idx) < n:
            raise KvqError(f"artifact {path} is inconsistent (tensor {key} for {n} layers)")
        states[int(idx)][name] = t
    return Artifact(method, states, meta.get("model", {}), meta.get("calibration", {}), str(path))
