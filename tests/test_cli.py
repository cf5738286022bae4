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
