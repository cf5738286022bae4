"""The only reader and writer of kvq artifacts (safetensors: per-layer tensors plus JSON metadata).

Layout: tensors ``layers.{i}.{name}`` (float32), and one metadata entry ``kvq`` holding JSON::

    {"schema_version": 2, "kvq_version": ..., "method": {...full config...},
     "model": {"architecture", "layers", "kv_heads", "head_dim", "q_heads", "rope_theta"},
     "calibration": {"dataset", "samples", "seqlen", "seed", ...}, "layers": ..., "sha256": ...}

``sha256`` covers the rest of the metadata and every tensor's bytes (``artifact_checks.digest``). Reading
validates everything before use (``artifact_checks``: schema, tensor headers against the method and the
fingerprint's geometry, the checksum, finite values); schema version 1 (no checksum) is refused with a pointer
to ``kvq calibrate``. Tuning-free methods get an artifact too (configuration only, no tensors). Files are written
under a temporary name, flushed to disk (fsync) and renamed, so an interrupted write leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import stat
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from . import artifact_checks as checks
from .errors import KvqError
from .hf_config import KVGeometry
from .lazy import torch
from .methods import KVMethod
from .methods.base import State

SCHEMA_VERSION = checks.SCHEMA_VERSION
_FINGERPRINT_KEYS = checks.FINGERPRINT_KEYS


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

    def mismatch(self, geom: KVGeometry) -> str | None:
        """How this artifact's model fingerprint differs from ``geom``'s, or None."""
        mine, theirs = self.model, fingerprint(geom)
        diff = [f"{k} {mine.get(k)} vs {theirs[k]}" for k in _FINGERPRINT_KEYS if mine.get(k) != theirs[k]]
        return f"made for another model ({'; '.join(diff)})" if diff else None

    def check_model(self, geom: KVGeometry) -> None:
        """Refuse use with a model whose KV geometry differs from the one calibrated."""
        why = self.mismatch(geom)
        if why:
            raise KvqError(f"{self.path or 'the artifact'} was {why}")


def save(artifact: Artifact, path: str | os.PathLike) -> Path:
    """Write atomically (temporary file in the same folder, fsync, rename); ``KvqError`` when it cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise KvqError(f"cannot write {path}: it exists and is not a regular file")
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tensors = {
        f"layers.{i}.{name}": t.detach().to("cpu", torch.float32).clone()  # clone: states may share tensors
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
    meta["sha256"] = checks.digest(meta, tensors)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        save_file(tensors, tmp, metadata={"kvq": json.dumps(meta, allow_nan=False)})
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except (OSError, SafetensorError) as exc:  # a full disk, a folder that cannot be written
        why = getattr(exc, "strerror", None) or str(exc).split(": ")[-1]
        raise KvqError(f"cannot write {path}: {why}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return path


def check_writable(out: str | os.PathLike) -> None:
    """Before any work: ``out`` names a ``.safetensors`` file (not a folder) in a folder that can be written."""
    path = Path(out)
    if not str(out).endswith(".safetensors"):
        raise KvqError(f"--out must name a .safetensors file, not {str(out)!r}")
    if path.exists() and not path.is_file():
        raise KvqError(f"--out {path} exists and is not a regular file")
    folder = next((p for p in [path.parent, *path.parent.parents] if p.exists()), Path("."))
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise KvqError(f"--out {path}: cannot write in {folder}")


def _fsync(path: str | os.PathLike) -> None:
    """Flush a file (or a folder's entries) to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_readable(path: Path, what: str = "artifact") -> None:
    """``KvqError`` unless ``path`` is an existing regular file (never a folder, FIFO or device)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        raise KvqError(f"{what} {path} not found") from None
    if not stat.S_ISREG(mode):
        raise KvqError(f"{what} {path} is not a regular file")


def load(path: str | os.PathLike, geom: KVGeometry | None = None) -> Artifact:
    """Read and validate an artifact (with ``geom``: also against that model before any tensor is read); every
    problem is one ``KvqError`` line naming the file."""
    path = Path(path)
    check_readable(path)
    try:
        return _load(path, geom)
    except KvqError as exc:
        sep = " " if str(exc).startswith("was ") else ": "
        raise KvqError(f"artifact {path}{sep}{exc}") from None
    except MemoryError:
        raise KvqError(f"artifact {path}: too large to read") from None


def _load(path: Path, geom: KVGeometry | None) -> Artifact:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("kvq")
            if raw is None:
                raise KvqError("a safetensors file but not a kvq artifact (no 'kvq' metadata)")
            meta = checks.parse_metadata(raw)
            method = checks.check_metadata(meta)
            art = Artifact(method, [], meta["model"], meta["calibration"], str(path))
            if geom is not None and art.mismatch(geom):
                raise KvqError(f"was {art.mismatch(geom)}")
            expected = checks.expected_shapes(method, meta["model"])
            names = list(f.keys())
            checks.check_names(names, expected)
            headers = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in names}
            checks.check_headers(headers, expected)
            tensors = {k: f.get_tensor(k) for k in names}
    except KvqError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for damaged files
        raise KvqError(f"corrupt or truncated ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"
                       ) from None
    if checks.digest(meta, tensors) != meta["sha256"]:
        raise KvqError("checksum mismatch: the file was changed or damaged after `kvq calibrate` wrote it")
    states: list[State] = [{} for _ in range(meta["layers"])]
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        states[int(idx)][name] = t
    checks.check_values(method, states)
    art.states = states
    return art
