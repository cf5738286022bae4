"""``kvq estimate-memory``: sizes, presets, the formulas against hand-computed cases, the CLI end to end."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass

import pytest
import torch
from typer.testing import CliRunner

from kvq_cli import memory
from kvq_cli.cli import app
from kvq_cli.errors import KvqError
from kvq_cli.methods import KVMethod, LayerCalibration, parse_spec
from kvq_cli.presets import GPU_PRESETS, MODEL_PRESETS, ModelShape, shape_from_config

GiB = 1 << 30
runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@dataclass
class TwoBitCodes(KVMethod):
    """Test-only: exactly 2 bits per K and V element, nothing else (codes only)."""

    name = "two-bit-codes"
    bits: int = 2

    @property
    def label(self) -> str:
        return "codes-2b"

    def bits_per_token(self, kv_heads: int, head_dim: int) -> float:
        return 2 * kv_heads * head_dim * 2


def entry(spec: str, shape: ModelShape) -> memory.Entry:
    return memory.Entry.from_method(parse_spec(spec), shape)


MQA = ModelShape("mqa", layers=4, hidden=512, heads=8, kv_heads=1, head_dim=64, intermediate=1024, vocab=1000,
                 tied_embeddings=True, max_positions=2048)


# ---- parsing --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, tokens",
    [("131072", 131072), ("128K", 131072), ("128k", 131072), ("1M", 1 << 20), ("10M", 10 << 20), ("1.5M", 3 << 19),
     (" 4k ", 4096), (2048, 2048)],
)
def test_parse_context(text, tokens):
    assert memory.parse_context(text) == tokens


@pytest.mark.parametrize("text, message", [("0", "positive"), ("-5", "positive"), ("abc", "cannot read"),
                                           ("12Q", "cannot read"), ("", "cannot read"), ("1M tokens", "cannot read")])
def test_parse_context_refusals(text, message):
    with pytest.raises(KvqError, match=message):
        memory.parse_context(text)


@pytest.mark.parametrize(
    "text, nbytes",
    [("80GiB", 80 * GiB), ("80GB", 80 * 10**9), ("80 gib", 80 * GiB), ("512MiB", 512 << 20), ("1.5TB", 15 * 10**11),
     ("1000", 1000)],
)
def test_parse_budget(text, nbytes):
    assert memory.parse_budget(text) == nbytes


@pytest.mark.parametrize("text", ["80G", "eighty", "0GB", "-1GiB", "80 GiBs"])
def test_parse_budget_refusals(text):
    with pytest.raises(KvqError):
        memory.parse_budget(text)


def test_gpu_presets():
    assert GPU_PRESETS["h100-80gb"] == GPU_PRESETS["a100-80gb"] == 80 * GiB
    assert GPU_PRESETS["h200"] == 150_109_880_320 and GPU_PRESETS["rtx4090"] == 24 * GiB
    with pytest.raises(KvqError, match="h100-80gb"):
        memory.gpu_bytes("v100")


# ---- presets and shapes ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, published",
    [("llama-2-7b", 6.74e9), ("llama-3-8b", 8.03e9), ("llama-2-70b", 6.9e10), ("mistral-7b", 7.24e9),
     ("qwen2.5-7b", 7.6e9), ("llama-3.1-70b", 7.06e10), ("smollm2-135m", 1.35e8)],
)
def test_preset_parameter_counts(name, published):
    assert MODEL_PRESETS[name].params == pytest.approx(published, rel=0.02)


def test_smollm2_preset_shapes():
    p = MODEL_PRESETS["smollm2-135m"]
    assert (p.layers, p.heads, p.kv_heads, p.head_dim, p.hidden, p.intermediate, p.vocab) == (30, 9, 3, 64, 576,
                                                                                            1536, 49152)
    assert p.tied_embeddings and p.max_positions == 8192 and p.rope_theta == 100000
    assert p.params == 134_515_008  # embeddings 28.3M (tied) + 30 x 3.54M + final norm


@pytest.mark.parametrize("tied", [False, True])
def test_shape_from_config_counts_like_the_model(arch, tied):
    from conftest import tiny_config, tiny_model

    shape = shape_from_config(tiny_config(arch, tie_word_embeddings=tied), "tiny")
    assert shape.params == sum(p.numel() for p in tiny_model(arch, tie_word_embeddings=tied).parameters())
    assert (shape.layers, shape.kv_heads, shape.head_dim) == (2, 2, 16)


def test_preset_wins_over_resolver(monkeypatch):
    import kvq_cli.models as models

    monkeypatch.setattr(models, "resolve_model", lambda spec: pytest.fail("the resolver was asked"))
    assert memory.resolve_shape("smollm2-135m") is MODEL_PRESETS["smollm2-135m"]
    assert memory.resolve_shape("LLAMA-2-7B") is MODEL_PRESETS["llama-2-7b"]


def test_resolve_shape_from_folder_reads_config_only(tiny_model_dir):
    shape = memory.resolve_shape(str(tiny_model_dir))
    assert (shape.layers, shape.heads, shape.kv_heads, shape.vocab, shape.max_positions) == (2, 4, 2, 320, 512)


def test_unknown_model_lists_presets():
    with pytest.raises(KvqError, match="llama-2-7b.*smollm2-135m"):
        memory.resolve_shape("no-such-model")


def test_config_missing_fields(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(KvqError, match="intermediate_size"):
        memory.resolve_shape(str(tmp_path))


# ---- formulas: the published figures ---------------------------------------------------------------
def test_llama_7b_fp16_128k_is_64_gib():
    shape = MODEL_PRESETS["llama-2-7b"]
    assert memory.kv_bytes(entry("fp16", shape), shape, 128 * 1024) == 64 * GiB
    assert 2 * 32 * 32 * 128 * 2 * 128 * 1024 == 64 * GiB  # 2 (K, V) x layers x heads x head_dim x 2 bytes x tokens


def test_llama_7b_2bit_codes_1m_is_64_gib():
    shape = MODEL_PRESETS["llama-2-7b"]
    codes = memory.Entry("codes-2b", TwoBitCodes(), 0)
    assert memory.kv_bytes(codes, shape, 1 << 20) == 64 * GiB


def test_llama_7b_kvquant_2bit_no_outliers_1m():
    """kvquant-2b-0%: 2-bit codes + per-token value scale and zero + 1 fp16 sink token + thresholds and codebooks."""
    shape = MODEL_PRESETS["llama-2-7b"]
    L, H, D, T = 32, 32, 128, 1 << 20
    e = entry("kvquant:bits=2,outliers=0", shape)
    per_token = L * H * (D * 2 + D * 2 + 2 * 16)  # bits: key codes, value codes, value scale + zero
    sink = L * 2 * H * D * 16
    state = L * 16 * (2 * H * D + 2 * 4)  # key_lo/key_hi + two 4-entry codebooks, fp16
    expected = (sink + (T - 1) * per_token + state) / 8
    assert memory.kv_bytes(e, shape, T) == pytest.approx(expected, rel=1e-12)
    assert expected / GiB == pytest.approx(68.0, abs=0.01)  # 2.125 bits per element: 68 GiB, not 64
    est = memory.estimate(shape, [e], T)
    assert est["results"][1]["avg_bits"] == pytest.approx(2.125, abs=1e-3)


# ---- formulas: hand-computed MHA / GQA / MQA with outliers, residual and sink -------------------------
def test_mha_kvquant_outliers_sink_batch():
    shape = MODEL_PRESETS["llama-2-7b"]  # MHA: 32 KV heads
    L, H, D, T, B = 32, 32, 128, 4096, 2
    n_out = 20  # per token over all KV heads: max(1, round(0.01 * H * D / 2))
    key = H * D * (3 + 0.01 * 32)  # per-channel codes + 1% sparse outliers (fp16 value + 16-bit position)
    value = H * (D * 3 + 2 * 16) + 2 * n_out * 32  # codes, scale + zero per head vector, top/bottom outliers
    pointers = 2 * H * 32 * (math.ceil((T - 1) / 64) + 1)  # int32 outlier row pointers per head and 64 tokens
    per_layer_seq = 1 * 2 * H * D * 16 + (T - 1) * (key + value) + pointers  # 1 sink token in fp16
    state = L * 16 * (2 * H * D + 2 * 8)
    expected = (B * L * per_layer_seq + state) / 8
    assert memory.kv_bytes(entry("kvquant:bits=3,outliers=0.01", shape), shape, T, B) == pytest.approx(expected)


def test_gqa_kivi_residual_window():
    shape = MODEL_PRESETS["llama-3-8b"]  # GQA: 8 KV heads of 32
    L, H, D, T = 32, 8, 128, 1000
    key = D * 2 + 2 * 16 * D / 32  # codes + scale/zero per channel per 32-token group
    value = D * 2 + 2 * 16 * math.ceil(D / 32)  # codes + scale/zero per 32-channel group
    expected = L * (128 * 2 * H * D * 16 + (T - 128) * H * (key + value)) / 8  # 128 residual tokens in fp16
    e = entry("kivi2", shape)
    assert memory.kv_bytes(e, shape, T) == pytest.approx(expected)
    assert memory.kv_bytes(e, shape, T, batch=3) == pytest.approx(3 * expected)
    fp16 = entry("fp16", shape)
    assert memory.kv_bytes(e, shape, 100) == memory.kv_bytes(fp16, shape, 100)  # all inside the window


def test_mqa_kvquant_sink_and_state():
    L, H, D, T = 4, 1, 64, 100
    key = D * (4 + 0.01 * 32)
    value = D * 4 + 2 * 16 + 2 * 1 * 32
    state = L * 16 * (2 * H * D + 2 * 16)
    pointers = 2 * H * 32 * (math.ceil((T - 2) / 64) + 1)
    expected = (L * (2 * 2 * H * D * 16 + (T - 2) * H * (key + value) + pointers) + state) / 8  # sink of 2 tokens
    e = entry("kvquant:bits=4,outliers=0.01,sink=2", MQA)
    assert memory.kv_bytes(e, MQA, T) == pytest.approx(expected)
    assert memory.kv_bytes(e, MQA, T, batch=2) == pytest.approx(2 * expected - state / 8)  # state counted once


@pytest.mark.parametrize("per_channel", [True, False])
def test_kvquant_state_estimate_matches_a_fit(per_channel):
    method = parse_spec(f"kvquant:bits=2,outliers=0.01,fisher=false,per_channel={per_channel},kmeans_iters=3")
    g = torch.Generator().manual_seed(0)
    calib = LayerCalibration(torch.randn(256, 2, 16, generator=g), torch.randn(256, 2, 16, generator=g))
    assert memory.state_bits_estimate(method, 2, 16) == method.state_bits(method.fit(calib))
    assert memory.state_bits_estimate(parse_spec("kivi2"), 2, 16) == 0


def test_allowance_formula():
    shape = MODEL_PRESETS["llama-3-8b"]  # 32 q heads, 8 KV heads, head_dim 128
    hidden = 2 * (4 * 4096 + 2 * 14336)  # bytes per chunk token
    ctx = 1 << 20
    fp16 = GiB + 4096 * hidden + 4096 * ctx * 2 + ctx * 2 * (32 + 8) * 128 * 2
    assert memory.allowance_bytes(shape, ctx) == fp16
    block = 16384  # history tokens per prefill block: 32 q heads x 128 x L = 2^26
    packed = GiB + 4096 * hidden + 4 * 8 * block * 128 * 4 + 2 * 32 * block * 128 * 2 + 4 * 32 * 4096 * 128 * 4
    assert memory.allowance_bytes(shape, ctx, method=parse_spec("kivi2")) == packed  # no mask
    assert memory.allowance_bytes(shape, 8 * ctx, method=parse_spec("kivi2")) == packed  # independent of context
    small = GiB + 2 * 100 * hidden + 2 * (4 * 8 * 100 * 128 * 4 + 2 * 32 * 100 * 128 * 2 + 4 * 32 * 100 * 128 * 4)
    assert memory.allowance_bytes(shape, 100, batch=2, method=parse_spec("kivi2")) == small
    assert memory.allowance_bytes(shape, ctx, method=parse_spec("kivi2"), chunk=512) < packed


def test_weights_bytes():
    shape = MODEL_PRESETS["llama-2-7b"]
    assert memory.weights_bytes(shape, "bf16") == 2 * shape.params == 2 * memory.weights_bytes(shape, "int8")
    assert memory.weights_bytes(shape, "int4") == shape.params / 2
    with pytest.raises(KvqError, match="weights-dtype"):
        memory.weights_bytes(shape, "fp8")


# ---- the estimate ----------------------------------------------------------------------------------
def test_estimate_fp16_first_and_max_context():
    shape = MODEL_PRESETS["llama-2-7b"]
    entries = [entry(s, shape) for s in ("kivi2", "fp16", "kvquant:bits=2,outliers=0.01")]
    est = memory.estimate(shape, entries, 128 * 1024, budget=80 * GiB)
    names = [r["name"] for r in est["results"]]
    assert names == ["fp16", "kivi-2b", "kvquant-2b-1%"]
    weights = memory.weights_bytes(shape)
    for e, r in zip(memory.with_fp16_first(entries, shape), est["results"], strict=True):
        m = r["max_context"]
        assert memory.total_bytes(e, shape, m, 1, weights) <= 80 * GiB < memory.total_bytes(e, shape, m + 1, 1, weights)
        assert r["fits"] == (est["context"] <= m)
        assert r["total_bytes"] == pytest.approx(r["kv_bytes"] + r["weights_bytes"] + r["allowance_bytes"])
    # closed form for fp16 beyond one chunk: total = fixed + per_token x context
    fixed = weights + GiB + 4096 * 2 * (4 * 4096 + 2 * 11008)
    per_token = 2 * 32 * 32 * 128 * 2 + 4096 * 2 + 2 * (32 + 32) * 128 * 2  # KV + mask row + attention workspace
    assert est["results"][0]["max_context"] == math.floor((80 * GiB - fixed) / per_token)
    assert est["results"][0]["kv_bytes_per_token"] == 512 * 1024
    assert est["notes"] and "4,096 positions" in est["notes"][0]


def test_estimate_gpus_multiply_budget_and_nothing_fits():
    shape = MODEL_PRESETS["llama-2-70b"]
    one = memory.estimate(shape, [], 1 << 20, gpu="a100-80gb")
    four = memory.estimate(shape, [], 1 << 20, gpu="a100-80gb", gpus=4)
    assert four["budget_bytes"] == 4 * one["budget_bytes"] == 320 * GiB
    assert one["results"][0]["max_context"] == 0 and not one["results"][0]["fits"]  # 138 GB of weights
    assert four["results"][0]["max_context"] > 0
    with pytest.raises(KvqError, match="gpus"):
        memory.estimate(shape, [], 1024, gpus=0)
    with pytest.raises(KvqError, match="batch"):
        memory.estimate(shape, [], 1024, batch=0)


def test_api_default_methods():
    from kvq_cli import api

    res = api.estimate_memory("smollm2-135m", "8K")
    assert [r["name"] for r in res["results"]] == ["fp16", "kivi-2b", "kivi-4b", "kvquant-4b-1%", "kvquant-3b-1%",
                                                   "kvquant-2b-1%"]
    assert res["budget_bytes"] == 80 * GiB and not res["notes"]
    with pytest.raises(KvqError, match="not both"):
        api.estimate_memory("smollm2-135m", "8K", gpu="h200", budget="80GB")


# ---- CLI -------------------------------------------------------------------------------------------
def test_cli_table():
    res = run("estimate-memory", "--model", "llama-2-7b", "--context", "128K", "--method", "kivi2")
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert out.index("fp16") < out.index("kivi-2b") and "64.00" in out and "h100-80gb" in out
    assert "not measured" in out


def test_cli_json_schema():
    res = run("estimate-memory", "-m", "llama-3-8b", "-c", "1M", "--batch", 2, "--budget", "80GB", "--gpus", 2,
              "--method", "kvquant:bits=2,outliers=0.01", "--method", "fp16", "--weights-dtype", "int4", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert {"model", "context", "batch", "budget_bytes", "results"} <= set(doc)
    assert (doc["model"], doc["context"], doc["batch"], doc["budget_bytes"]) == ("llama-3-8b", 1 << 20, 2, 160e9)
    keys = {"name", "avg_bits", "kv_bytes_per_token", "kv_bytes", "weights_bytes", "total_bytes", "fits", "max_context",
            "allowance_bytes", "placement"}  # the keys, each row's allowance, --gpus 2: the layer split
    assert [set(r) for r in doc["results"]] == [keys, keys]
    assert [r["name"] for r in doc["results"]] == ["fp16", "kvquant-2b-1%"]
    assert doc["results"][0]["kv_bytes"] == 2 * 32 * 2 * 8 * 128 * 2 * (1 << 20)  # batch 2, GQA 8 KV heads
    assert "positions" in res.stderr  # 1M is beyond 8K positions: a note, not an error


def test_cli_plot_writes_png(tmp_path):
    out = tmp_path / "mem.png"
    res = run("estimate-memory", "-m", "smollm2-135m", "-c", "64K", "--plot", out)
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib(tmp_path, monkeypatch):
    from kvq_cli.plotting import memory_plot

    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(KvqError, match="matplotlib"):
        memory_plot(tmp_path / "x.png", {}, GiB, "t")


def test_cli_artifact_state_counts_like_its_estimate(tiny_model_dir, tiny_text_file, tmp_path):
    art = tmp_path / "kvq2.safetensors"
    res = run("calibrate", "--model", tiny_model_dir, "--dataset", tiny_text_file, "--samples", 2, "--seqlen", 32,
              "--method", "kvquant", "--bits", 2, "--outliers", 0.01, "--out", art)
    assert res.exit_code == 0, res.output
    res = run("estimate-memory", "-m", tiny_model_dir, "-c", 256, "-a", art,
              "--method", "kvquant:bits=2,outliers=0.01", "--json")
    assert res.exit_code == 0, res.output
    fp16, from_artifact, from_config = json.loads(res.stdout)["results"]
    assert from_artifact["name"] == from_config["name"] == "kvquant-2b-1%"
    assert from_artifact["kv_bytes"] == pytest.approx(from_config["kv_bytes"])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model", "no-such-model"], "presets for estimates"),
        (["--context", "0"], "positive"),
        (["--context", "abc"], "cannot read context"),
        (["--budget", "80G"], "cannot read budget"),
        (["--gpu", "v100"], "unknown GPU"),
        (["--gpu", "h200", "--budget", "80GB"], "not both"),
        (["--weights-dtype", "fp8"], "weights-dtype"),
        (["--method", "kivi:bits=3"], "supports bits"),
        (["--plot", "/no/such/folder/x.png"], "does not exist"),
        (["--artifact", "/no/such.safetensors"], "not found"),
    ],
)
def test_cli_refusals_exit_2(extra, message):
    res = run("estimate-memory", "--model", "llama-2-7b", *extra)
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output


def test_cli_config_missing_fields_exit_2(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path)
    res = run("estimate-memory", "--model", tmp_path)
    assert res.exit_code == 2 and "intermediate_size" in res.output
