"""The CLI end to end on a tiny local model: tables, JSON, exit codes, one-line errors."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from kvq_cli.cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_help_lists_commands():
    res = run("--help")
    assert res.exit_code == 0 and "eval-ppl" in res.output


def test_eval_ppl_json(tiny_model_dir, tiny_text_file):
    res = run("eval-ppl", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--seqlen", 64, "--max-windows", 2,
              "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["windows"] == 2 and doc["tokens"] == 128 and doc["seqlen"] == 64
    assert [r["name"] for r in doc["results"]] == ["baseline"]
    assert set(doc["results"][0]) == {"name", "perplexity", "avg_bits", "kl_divergence", "top1_agreement"}


def test_eval_ppl_table(tiny_model_dir, tiny_text_file):
    res = run("eval-ppl", "-m", tiny_model_dir, "-d", tiny_text_file, "--seqlen", 32, "--max-windows", 1,
              "--method", "fp16")
    assert res.exit_code == 0, res.output
    assert "baseline" in res.output and "fp16" in res.output


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "no-such-model"], "unknown model"),
        (["--dataset", "/no/such/file.txt"], "neither a known name"),
        (["--seqlen", "100000"], "beyond the model's"),
        (["--seqlen", "100000000", "--max-windows", "1"], "beyond the model's"),
        (["--method", "nosuchmethod"], "unknown method"),
        (["--method", "fp16:bits=3"], "supports bits"),
        (["--artifact", "/no/such.safetensors"], "not found"),
    ],
)
def test_bad_input_is_one_line_exit_2(tiny_model_dir, tiny_text_file, extra, message):
    args = ["eval-ppl", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--seqlen", 64, *extra]
    res = run(*args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_text_too_short(tiny_model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    res = run("eval-ppl", "--model", tiny_model_dir, "--dataset", short, "--seqlen", 256)
    assert res.exit_code == 2 and "too short" in res.output


def test_calibrate_then_evaluate(tiny_model_dir, tiny_text_file, tmp_path):
    art = tmp_path / "kvq2.safetensors"
    res = run("calibrate", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--samples", 3, "--seqlen", 48,
              "--method", "kvquant", "--bits", 2, "--outliers", 0.01, "--out", art, "--json")
    assert res.exit_code == 0, res.output
    info = json.loads(res.stdout)
    assert info["name"] == "kvquant-2b-1%" and info["layers"] == 2 and art.is_file()
    tuning_free = tmp_path / "kivi.safetensors"
    res = run("calibrate", "--model", tiny_model_dir, "--method", "kivi", "--bits", 4, "--out", tuning_free)
    assert res.exit_code == 0, res.output
    res = run("eval-ppl", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--seqlen", 64, "--max-windows", 2,
              "--artifact", art, "--artifact", tuning_free, "--method", "int4", "--json")
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["results"]
    assert [r["name"] for r in rows] == ["baseline", "kvquant-2b-1%", "kivi-4b", "int-4b"]
    assert all(r["kl_divergence"] > 0 for r in rows[1:])
    assert 2 < rows[1]["avg_bits"] < 8  # 2-bit codes + outliers (>= 1 per value vector) + scales at head_dim 16


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--method", "kvquant", "--bits", 5], "supports bits"),
        (["--method", "kivi", "--bits", 3], "supports bits"),
        (["--method", "kivi", "--outliers", 0.01], "does not take --outliers"),
        (["--samples", 1000], "too little"),
        (["--out", "x.pt"], ".safetensors"),
    ],
)
def test_calibrate_refusals(tiny_model_dir, tiny_text_file, tmp_path, extra, message):
    out = ["--out", tmp_path / "a.safetensors"] if "--out" not in extra else []
    res = run("calibrate", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--seqlen", 64, *out, *extra)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not (tmp_path / "a.safetensors").exists()


def test_artifact_for_another_model(tiny_model_dir, tiny_text_file, tmp_path):
    from conftest import tiny_model

    other = tmp_path / "other-model"
    tiny_model("llama", num_hidden_layers=3).save_pretrained(other)
    art = tmp_path / "other.safetensors"
    assert run("calibrate", "--model", other, "--method", "int", "--bits", 4, "--out", art).exit_code == 0
    res = run("eval-ppl", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--seqlen", 64, "--artifact", art)
    assert res.exit_code == 2 and "another model" in res.output


def test_methods_and_version():
    res = run("methods", "--json")
    assert res.exit_code == 0
    rows = {m["name"]: m for m in json.loads(res.stdout)}
    assert {"fp16", "int", "nf", "kivi", "kvquant"} <= set(rows)
    assert rows["kvquant"]["needs_calibration"] and rows["kvquant"]["bits"] == [1, 2, 3, 4]
    assert rows["kivi"]["options"]["group"] == 32 and rows["kivi"]["summary"]
    assert "kvquant" in run("methods").output
    res = run("--version")
    assert res.exit_code == 0 and res.output.startswith("kvq ")
