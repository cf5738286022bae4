"""``kvq generate``: prompts of exact length, the passkey haystack, the loop, pre-flight refusals, the CLI."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from kvq_cli import load_cache
from kvq_cli.cli import app
from kvq_cli.errors import KvqError
from kvq_cli.generate import preflight, run
from kvq_cli.memory import Entry
from kvq_cli.methods import make_method, parse_spec
from kvq_cli.presets import MODEL_PRESETS
from kvq_cli.prompts import INSTRUCTION, NEEDLE, QUESTION, file_prompt, fit_tokens, haystack_prompt, passkey_answer


def test_fit_tokens_repeats_or_cuts():
    assert fit_tokens([1, 2, 3], 7) == [1, 2, 3, 1, 2, 3, 1]
    assert fit_tokens([1, 2, 3], 2) == [1, 2]
    with pytest.raises(KvqError):
        fit_tokens([], 3)


@pytest.mark.parametrize("context, depth", [(300, 0.0), (301, 0.5), (512, 1.0)])
def test_haystack_has_exact_length_and_the_needle_at_depth(tiny_tokenizer, tiny_text, context, depth):
    p = haystack_prompt(tiny_tokenizer, tiny_text, context, depth, seed=3)
    ids = p.ids[0].tolist()
    assert len(ids) == context and p.passkey.isdigit() and len(p.passkey) == 5
    enc = lambda t: tiny_tokenizer(t, add_special_tokens=False)["input_ids"]  # noqa: E731
    head, needle, tail = enc(INSTRUCTION), enc(NEEDLE.format(key=p.passkey)), enc(QUESTION)
    fill = context - len(head) - len(needle) - len(tail)
    assert ids[: len(head)] == head and ids[-len(tail):] == tail
    assert p.needle_token == len(head) + round(depth * fill)  # the asked fraction of the filler comes first
    assert ids[p.needle_token : p.needle_token + len(needle)] == needle
    again = haystack_prompt(tiny_tokenizer, tiny_text, context, depth, seed=3)
    assert torch.equal(again.ids, p.ids)
    assert haystack_prompt(tiny_tokenizer, tiny_text, context, depth, 4).passkey != p.passkey
    with pytest.raises(KvqError, match="too short"):
        haystack_prompt(tiny_tokenizer, tiny_text, 10, depth, 0)
    with pytest.raises(KvqError, match="depth"):
        haystack_prompt(tiny_tokenizer, tiny_text, context, 1.5, 0)


def test_file_prompt_and_answer(tiny_tokenizer):
    assert file_prompt(tiny_tokenizer, "the cat sat", 50).ids.shape == (1, 50)
    assert passkey_answer(" 12345. Remember") == "12345" and passkey_answer(" no digits") is None


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("spec", ["fp16", "kivi:bits=4,residual=8,group=8", "int4"])
def test_run_equals_plain_greedy_generate(spec, arch):
    """Chunked prefill + greedy decoding through the cache equals the plain model's greedy ``generate`` for
    16-bit; every configuration produces the asked number of tokens."""
    model = tiny_model(arch)
    ids = torch.randint(0, 320, (1, 37), generator=torch.Generator().manual_seed(0))
    cache = load_cache(parse_spec(spec), model, max_tokens=64)
    out = run(model, cache, ids, max_new_tokens=9, chunk=10, eos=set())
    cache.unbind()
    assert len(out["new_ids"]) == 9 and out["decode_steps"] == 8 and out["prefill_tokens_per_s"] > 0
    if spec == "fp16":
        plain = model.generate(ids, max_new_tokens=9, do_sample=False)[0, 37:].tolist()
        assert out["new_ids"] == plain


def test_run_stops_at_eos():
    model = tiny_model("qwen2")
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(1))
    first = run(model, load_cache(make_method("fp16"), model), ids, 5, 4, eos=set())["new_ids"]
    stopped = run(model, load_cache(make_method("fp16"), model), ids, 5, 4, eos={first[1]})["new_ids"]
    assert stopped == first[:2]


def test_preflight_refuses_with_the_largest_context():
    shape = MODEL_PRESETS["llama-3-8b"]
    entry = Entry.from_method(parse_spec("fp16"), shape)
    ok = preflight(shape, entry, 32768, "bf16", 80 << 30, "test GPU", 4096)
    assert ok["estimated_bytes"] < 80 << 30
    with pytest.raises(KvqError, match=r"do not fit on test GPU.*largest context that fits is [\d,]+ tokens with fp16"
                                       r".*with kvquant-2b"):
        preflight(shape, entry, 1 << 20, "bf16", 80 << 30, "test GPU", 4096)


def _invoke(*args):
    return CliRunner().invoke(app, ["generate", *map(str, args)])


def test_cli_haystack_json(tiny_model_dir, tiny_text_file):
    r = _invoke("--model", tiny_model_dir, "--method", "kivi:bits=2,residual=8,group=8", "--haystack",
                "--context", 300, "--depth", 0.25, "--max-new-tokens", 5, "--chunk", 64, "--json",
                "--filler", tiny_text_file)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    need = {"prompt_tokens", "generated_text", "passkey", "passkey_correct", "prefill_tokens_per_s",
            "decode_tokens_per_s", "peak_memory_bytes", "cache_bytes", "avg_bits", "estimated_bytes"}
    assert need <= set(doc) and doc["prompt_tokens"] == 300 and doc["new_tokens"] <= 5
    assert 2 < doc["avg_bits"] < 16 and doc["passkey_correct"] == (doc["passkey_answer"] == doc["passkey"])


def test_cli_prompt_file_baseline_and_random_model(tiny_model_dir, tiny_text_file):
    r = _invoke("--model", tiny_model_dir, "--prompt-file", tiny_text_file, "--context", "100", "--max-new-tokens",
                3, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    # a float32 model on the CPU keeps float32 K/V: the baseline is named for what it holds
    assert doc["configuration"] == "fp32 (DynamicCache)" and doc["prompt_tokens"] == 100 and "passkey" not in doc
    assert doc["avg_bits"] == pytest.approx(32.0)
    r = _invoke("--model", "random:smollm2-135m", "--method", "int4", "--context", 40, "--max-new-tokens", 2)
    assert r.exit_code == 0, r.output
    assert "prompt tokens" in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--haystack"], "needs --context"),
    ([], "--prompt-file F or --haystack"),
    (["--method", "kvquant", "--haystack", "--context", 300], "needs calibration"),
    (["--haystack", "--context", "1G"], "do not fit"),
    (["--haystack", "--prompt-file", "x.txt"], "not both"),
    (["--method", "kivi7", "--haystack", "--context", 300], "bits"),
])
def test_cli_refusals(tiny_model_dir, tiny_text_file, args, message):
    r = _invoke("--model", tiny_model_dir, "--filler", tiny_text_file, *args)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output


def test_random_model_calibrates_on_random_ids(tmp_path):
    from kvq_cli import api
    from kvq_cli.artifact import load

    out = api.calibrate(parse_spec("kvquant:bits=2,outliers=0.01,kmeans_iters=2"), str(tmp_path / "r.safetensors"),
                        model="random:smollm2-135m", samples=1, seqlen=32)
    art = load(out["artifact"])
    assert art.calibration["dataset"] == "random token ids" and len(art.states) == 30
