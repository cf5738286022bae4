"""Fuzzing the artifact reader: several hundred seeded variants of a small kvquant artifact on a tiny Llama.

Every variant is either refused (``KvqError``; through the CLI: exit 2, one line, no traceback) or, when it
loads, decodes to finite logits equal to the unmutated artifact's. Variants come in three families:

* damage (bit flips anywhere, truncations, appended bytes, a rewritten header length): refused or harmless;
* hostile metadata re-signed with a fresh checksum (wrong types, out-of-range values, missing or unknown fields):
  the schema must refuse every one;
* hostile tensors re-signed (NaN, Inf, beyond fp16, unsorted codebooks, ``key_lo > key_hi``, other dtypes and
  shapes, missing, renamed, extra): refused.
"""

from __future__ import annotations

import json
import random
import struct

import pytest
import torch
from conftest import tiny_model
from safetensors.torch import save_file

from kvq_cli import artifact as artifact_io
from kvq_cli import artifact_checks as checks
from kvq_cli import load_cache
from kvq_cli.errors import KvqError
from kvq_cli.hf_attention import cache_kwargs, geometry_from_config
from kvq_cli.methods import make_method

IDS = torch.arange(3, 15)[None]  # (1, 12): past the sink, through the quantized history


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def original(model, tmp_path_factory):
    """A valid kvquant 2-bit 1% artifact (bytes, metadata, tensors) and the logits it decodes to."""
    geom = geometry_from_config(model.config)
    g = torch.Generator().manual_seed(0)
    states = []
    for _ in range(geom.layers):
        lo = -torch.rand(2, 16, generator=g) - 0.5
        states.append({"key_codebook": torch.tensor([-0.9, -0.3, 0.2, 0.8]), "value_codebook": torch.linspace(-1, 1, 4),
                       "key_lo": lo, "key_hi": lo + 1.5})
    art = artifact_io.Artifact(make_method("kvquant", bits=2, outliers=0.01), states, artifact_io.fingerprint(geom),
                               {"dataset": "x", "samples": 1})
    path = artifact_io.save(art, tmp_path_factory.mktemp("fuzz") / "a.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["kvq"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    return path.read_bytes(), meta, tensors, _logits(path, model)


def _logits(path, model) -> torch.Tensor:
    cache = load_cache(str(path), model)
    try:
        with torch.no_grad():
            return model(IDS, **cache_kwargs(model, cache), use_cache=True).logits
    finally:
        cache.unbind()


def _signed(meta: dict, tensors: dict) -> tuple[dict, dict]:
    """Metadata with a checksum that matches (a hostile writer's, not damage)."""
    meta = {k: v for k, v in meta.items() if k != "sha256"}
    try:
        meta["sha256"] = checks.digest(meta, tensors)
    except (ValueError, TypeError):
        meta["sha256"] = "0" * 64
    return meta, tensors


def _damaged(data: bytes, rng: random.Random) -> list[bytes]:
    """Bit flips (header and data), truncations, appended bytes, rewritten header lengths."""
    (n,) = struct.unpack("<Q", data[:8])
    out = []
    for i in range(160):
        pos = rng.randrange(8, 8 + n) if i % 2 else rng.randrange(len(data))
        out.append(data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1 :])
    out += [data[: rng.randrange(len(data))] for _ in range(20)] + [b"", data[:7], data[:8]]
    out += [data + bytes(rng.randrange(256) for _ in range(k)) for k in (1, 4, 64)]
    for size in (0, 1, 2, n - 1, n + 1, n + 8, len(data), 2**32, 2**63, 2**64 - 1):
        out.append(struct.pack("<Q", size) + data[8:])
    return out


BAD = {int: [None, "x", 1.5, True, -1, 10**30, [], {}], float: [None, "x", True, -0.5, 1e30, [1]],
       bool: [None, "no", 0, 1, [], {}], str: [None, 3, "", "x" * 300, []]}
MODEL_TYPES = {"architecture": str, "layers": int, "kv_heads": int, "head_dim": int, "q_heads": int,
               "rope_theta": float}


def _hostile_metadata(meta: dict, tensors: dict) -> list[tuple[dict, dict]]:
    """Re-signed metadata that the schema must refuse."""
    method = make_method("kvquant")
    kinds = {k: type(v) for k, v in method.config().items() if k != "method"}
    out = []
    for key, kind in kinds.items():
        for bad in BAD[kind]:
            if (key in ("bits", "sink") and bad == 1) or (key == "layer_bits" and bad == ""):  # valid values
                continue
            out.append({**meta, "method": {**meta["method"], key: bad}})
        out.append({**meta, "method": {k: v for k, v in meta["method"].items() if k != key} | {key: None}})
    out.append({**meta, "method": {**meta["method"], "bits": 3}})  # disagrees with the 4-entry codebooks
    out.append({**meta, "method": {**meta["method"], "per_channel": False}})  # key_lo/key_hi then unexpected
    out.append({**meta, "method": {**meta["method"], "head_codebooks": True}})
    out.append({**meta, "method": {**meta["method"], "method": "kivi"}})
    out.append({**meta, "method": {**meta["method"], "bogus": 1}})
    out.append({**meta, "method": ["kvquant"]})
    for key, kind in MODEL_TYPES.items():
        for bad in BAD[kind] + ([0, 3, 10**9] if kind is int else [0.0]):
            if key == "layers" and bad == 1:
                continue
            out.append({**meta, "model": {**meta["model"], key: bad}})
    out.append({**meta, "model": [1, 2]})
    for key in ("schema_version", "layers", "kvq_version", "calibration", "model", "method"):
        out.append({k: v for k, v in meta.items() if k != key})
    for version in (1, 3, "2", True, None, 2.5):
        out.append({**meta, "schema_version": version})
    for layers in (3, 1, 0, -1, 10**9, "2", True, 2.0):
        out.append({**meta, "layers": layers})
    out += [{**meta, "calibration": []}, {**meta, "extra": 1}, {**meta, "kvq_version": 2}]
    return [_signed(m, tensors) for m in out]


def _hostile_tensors(meta: dict, tensors: dict) -> list[tuple[dict, dict]]:
    """Re-signed tensors that the value, dtype and shape checks must refuse."""
    name = "layers.1.key_codebook"
    book = tensors[name]
    edits = [
        {name: torch.tensor([0.0, float("nan"), 0.1, 0.2])}, {name: torch.tensor([0.0, 0.1, 0.2, float("inf")])},
        {name: torch.tensor([-1e6, 0.0, 0.1, 0.2])}, {name: book.flip(0)}, {name: book.half()}, {name: book.double()},
        {name: book.to(torch.int32)}, {name: book > 0}, {name: book[:3]}, {name: book[None]}, {name: torch.zeros(0)},
        {"layers.0.key_hi": tensors["layers.0.key_lo"] - 1}, {"layers.0.key_lo": torch.zeros(16, 2)},
        {"layers.2.key_codebook": book}, {"layers.00.key_codebook": book}, {"bogus": book}, {"layers.1.bogus": book},
        {"layers.-1.key_codebook": book}, {"layers.1.value_codebook": torch.full((4,), float("-inf"))},
    ]
    out = [{**tensors, **e} for e in edits]
    for drop in ("layers.1.key_codebook", "layers.0.key_hi"):
        out.append({k: v for k, v in tensors.items() if k != drop})
    renamed = {k.replace("layers.1.key_codebook", "layers.1.key_codebooks"): v for k, v in tensors.items()}
    out += [renamed, {}]
    return [_signed(dict(meta), t) for t in out]


def _write(path, meta: dict, tensors: dict) -> None:
    try:
        text = json.dumps(meta)
    except ValueError:
        text = "{}"
    save_file({k: v.clone() for k, v in tensors.items()}, str(path), metadata={"kvq": text})


def test_fuzz_artifacts(original, model, tmp_path):
    data, meta, tensors, expected = original
    rng = random.Random(19)
    refused = accepted = 0
    damaged = _damaged(data, rng)
    hostile = _hostile_metadata(meta, tensors) + _hostile_tensors(meta, tensors)
    assert len(damaged) + len(hostile) >= 300
    for i, blob in enumerate(damaged):
        path = tmp_path / f"d{i}.safetensors"
        path.write_bytes(blob)
        try:
            got = _logits(path, model)
        except KvqError:
            refused += 1
            continue
        accepted += 1
        assert torch.isfinite(got).all() and torch.equal(got, expected), f"damaged variant {i} decodes differently"
    for i, (m, t) in enumerate(hostile):
        path = tmp_path / f"h{i}.safetensors"
        _write(path, m, t)
        with pytest.raises(KvqError):
            artifact_io.load(path, geometry_from_config(model.config))
        with pytest.raises(KvqError):
            load_cache(str(path), model)
    assert refused > 150 and refused + accepted == len(damaged)


def test_fuzz_through_the_cli(original, tiny_model_dir, tmp_path):
    """A sample of variants through `kvq estimate-memory`: exit 2, one line on stderr, no traceback."""
    from typer.testing import CliRunner

    from kvq_cli.cli import app

    data, meta, tensors, _ = original
    variants = _damaged(data, random.Random(7))[::12]
    for i, blob in enumerate(variants):
        path = tmp_path / f"c{i}.safetensors"
        path.write_bytes(blob)
        res = CliRunner().invoke(app, ["estimate-memory", "--model", str(tiny_model_dir), "--artifact", str(path),
                                       "--context", "1K"])
        assert res.exit_code in (0, 2), res.output
        if res.exit_code == 2:
            assert "Traceback" not in res.output and res.output.strip().count("\n") == 0, res.output
