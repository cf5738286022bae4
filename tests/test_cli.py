"""The CLI end to end on a tiny local model: tables, JSON, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

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


# --- the shared vocabulary (issue 20): each option accepted by each command that should take it ----------------------
FAKE_RUN = {"model": "m", "dataset": "d", "seqlen": 64, "windows": 1, "tokens": 64, "mode": "simulated",
            "device": "cpu", "dtype": "float32", "seconds": 0, "notes": [],
            "results": [{"name": "baseline", "perplexity": 2.0, "avg_bits": 16.0, "kl_divergence": 0.0,
                         "top1_agreement": 1.0}]}


@pytest.fixture
def fakes(monkeypatch):
    """The library entry points replaced by recorders: options are checked and forwarded, no model ever loads."""
    import kvq_cli.api
    import kvq_cli.generate
    import kvq_cli.models

    calls: dict[str, dict] = {}

    def record(name, result):
        def fake(*args, **kwargs):
            calls[name] = {"args": args, **kwargs}
            return result
        return fake

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(kvq_cli.models, "load_model", no_model)
    monkeypatch.setattr(kvq_cli.api, "eval_ppl", record("eval-ppl", FAKE_RUN))
    monkeypatch.setattr(kvq_cli.api, "calibrate", record("calibrate", {
        "artifact": "a.safetensors", "name": "kvquant-4b", "model": "m", "layers": 2, "avg_bits": 4.5,
        "calibration": {"seconds": 0}}))
    monkeypatch.setattr(kvq_cli.generate, "generate", record("generate", {
        "model": "m", "configuration": "c", "dtype": "float32", "device": "cpu", "prompt_tokens": 8, "new_tokens": 1,
        "prefill_tokens_per_s": 1.0, "prefill_seconds": 1.0, "decode_tokens_per_s": None, "first_step_seconds": None,
        "graph_steps": 0, "eager_steps": 0, "peak_memory_bytes": 0, "estimated_bytes": 0, "cache_bytes": 0,
        "estimated_kv_bytes": 0, "avg_bits": 16.0, "notes": []}))
    return calls


SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
BASE = {"calibrate": ["--data-dir", str(SHARED)], "eval-ppl": ["--data-dir", str(SHARED)],
        "generate": ["--prompt-file", __file__], "estimate-memory": ["-c", "8K"]}
COMMANDS = ("calibrate", "eval-ppl", "generate", "estimate-memory")
# option, value, the commands that take it, and the method spec that has the option
VOCABULARY = [
    ("--method", "kivi2", COMMANDS, None),
    ("--bits", "4", COMMANDS, "kivi"),
    ("--group", "64", COMMANDS, "kivi"),
    ("--residual", "16", COMMANDS, "kivi"),
    ("--sink", "2", COMMANDS, "kivi"),
    ("--outliers", "0.01", ("calibrate", "estimate-memory"), "kvquant"),
    ("--batch", "2", ("eval-ppl", "estimate-memory"), None),
    ("--batch-size", "2", ("eval-ppl", "estimate-memory"), None),  # the old spelling, hidden
    ("--chunk", "256", ("eval-ppl", "generate", "estimate-memory"), None),
    ("--device", "cpu", ("calibrate", "eval-ppl", "generate"), None),
    ("--dtype", "bf16", COMMANDS, None),
    ("--weights-dtype", "int4", ("estimate-memory",), None),  # the old spelling, hidden
    ("--trust-remote-code", None, COMMANDS, None),
    ("--json", None, COMMANDS, None),
]


@pytest.mark.parametrize("option, value, takers, spec", VOCABULARY, ids=[v[0] for v in VOCABULARY])
@pytest.mark.parametrize("command", COMMANDS)
def test_shared_vocabulary(fakes, command, option, value, takers, spec):
    if not SHARED.is_dir() and command in ("calibrate", "eval-ppl"):
        pytest.skip("no shared corpora")
    args = [command, *BASE[command], option] + ([value] if value is not None else [])
    args += ["--method", spec] if spec else []
    res = run(*args)
    if command not in takers:
        assert res.exit_code == 2 and "Traceback" not in res.output, res.output  # refused, never ignored
        return
    assert res.exit_code == 0, res.output
    if command == "estimate-memory":
        return  # the real arithmetic ran (presets, no model)
    sent = fakes[command]
    if option == "--method":
        methods = sent["args"][0:1] if command == "calibrate" else [*sent.get("methods", [sent.get("method")])]
        assert methods[0].label == "kivi-2b"
    elif spec:  # a default for the method: it reached the method's configuration
        method = sent["args"][0] if command == "calibrate" else (sent.get("methods") or [sent.get("method")])[0]
        key = option.lstrip("-")
        assert str(method.config()[key]).rstrip("0").rstrip(".") == value.rstrip("0").rstrip(".")
    elif option in ("--batch", "--batch-size"):
        assert sent["batch_size"] == 2
    elif option == "--chunk":
        assert sent["chunk"] == 256
    elif option == "--dtype":
        assert sent["dtype"] == "bfloat16"
    elif option == "--device":
        assert sent["device"] == "cpu"
    elif option == "--trust-remote-code":
        assert sent["trust_remote_code"] is True


@pytest.mark.parametrize("args, message", [
    (["generate", "--haystack"], "--haystack needs --context"),
    (["generate", "--prompt-file", __file__, "--depth", "0.5"], "without --haystack"),
    (["generate", "--haystack", "--prompt-file", __file__, "-c", "1K"], "not both"),
    (["generate", "--prompt-file", __file__, "--method", "kvquant"], "needs calibration"),
    (["eval-ppl", "--data-dir", str(SHARED), "--method", "kvquant"], "needs calibration"),
    (["eval-ppl", "--data-dir", str(SHARED), "--bits", "3"], "give --method too"),
    (["eval-ppl", "--data-dir", str(SHARED), "--method", "kivi2", "--outliers", "0.01"], "does not take --outliers"),
    (["eval-ppl", "--data-dir", "/no/such/dir"], "not found under --data-dir"),
    (["eval-ppl", "--data-dir", str(SHARED), "--dtype", "fp8"], "--dtype must be"),
    (["calibrate", "--method", "kivi", "--method", "int4", "--out", "x.safetensors"], "is a folder"),
    (["estimate-memory", "--dtype", "fp8"], "--dtype"),
    (["estimate-memory", "--sink", "1"], "give --method too"),
])
def test_option_errors_come_before_any_model(fakes, args, message):
    res = run(*args)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output and res.output.strip().count("\n") == 0
    assert not fakes, "the library was called"


def test_aliases_rewritten():
    from kvq_cli.options import rewrite_aliases

    assert rewrite_aliases(["eval-ppl", "--batch-size", "4", "--batch-size=2", "--", "--batch-size"]) == [
        "eval-ppl", "--batch", "4", "--batch=2", "--", "--batch-size"]


def test_help_teaches():
    for command in COMMANDS:
        text = run(command, "--help").output
        assert "<bool>" not in text and "Example" in text, command
        assert "--method" in text and "--dtype" in text and "--json" in text, command
    assert "cq" in run("calibrate", "--help").output and "pq" in run("calibrate", "--help").output
    assert "128" in run("eval-ppl", "--help").output and "4096" in run("generate", "--help").output


def test_methods_table_plain_and_cq_pq_bits():
    out = run("methods").output
    assert "``" not in out and "/channel" in out


def test_eval_ppl_several_datasets_and_seqlens(tiny_model_dir, tiny_text_file, tmp_path):
    other = tmp_path / "other.txt"
    other.write_text(open(tiny_text_file).read()[::-1])
    res = run("eval-ppl", "-m", tiny_model_dir, "-d", tiny_text_file, "-d", other, "--seqlen", 32, "--seqlen", 48,
              "--max-windows", 1, "--method", "kivi2", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert [(r["dataset"], r["seqlen"]) for r in doc["runs"]] == [
        (str(tiny_text_file), 32), (str(tiny_text_file), 48), (str(other), 32), (str(other), 48)]
    assert all([x["name"] for x in r["results"]] == ["baseline", "kivi-2b"] for r in doc["runs"])
    assert any("residual window is not applied" in n for n in doc["notes"])
    table = run("eval-ppl", "-m", tiny_model_dir, "-d", tiny_text_file, "-d", other, "--seqlen", 32, "--seqlen", 48,
                "--max-windows", 1, "--method", "kivi2").stdout
    assert "seqlen" in table and "avg bits = every bit" in table and "at 48 tokens" in table


def test_estimate_memory_plot_and_table_agree(tmp_path):
    from kvq_cli import memory
    from kvq_cli.methods import parse_spec
    from kvq_cli.presets import MODEL_PRESETS

    res = run("estimate-memory", "-m", "llama-3-8b", "-c", "1M", "--gpus", 2, "--budget", "24GB", "--json")
    doc = json.loads(res.stdout)
    shape = MODEL_PRESETS["llama-3-8b"]
    entry = memory.Entry.from_method(parse_spec("fp16"), shape)
    xs, ys = memory.curves(shape, [entry], 1, "bf16", doc["budget_bytes"] / 2, 2, 1 << 21)["fp16"]
    at = min(range(len(xs)), key=lambda i: abs(xs[i] - (1 << 20)))
    fullest = max(p["total_bytes"] for p in doc["results"][0]["placement"])
    assert ys[at] == memory.table_total(entry, shape, xs[at], 1, "bf16", doc["budget_bytes"] / 2, 2)[1]
    total, top = memory.table_total(entry, shape, 1 << 20, 1, "bf16", doc["budget_bytes"] / 2, 2)
    assert (top, total) == (fullest, doc["results"][0]["total_bytes"])  # the plot's curve is the table's number
    text = run("estimate-memory", "-m", "llama-3-8b", "-c", "1M", "--gpus", 2, "--budget", "24GB").stdout
    assert "GPU1 layers 16-31: 100.82 GiB" in text and "causal mask" in text and "fullest GPU" in text
