"""Fast answers: `kvq --help`, `kvq methods`, `kvq estimate-memory` and the refusals the options or a model's
config.json decide import neither torch nor transformers (seconds each on a small machine). No timing is measured:
each check asserts what was imported. The JSON reading of config.json is compared with transformers' own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from kvq_cli import blocks, hf_config
from kvq_cli.errors import KvqError
from kvq_cli.models import check_supported, precheck
from kvq_cli.presets import MODEL_PRESETS, RANDOM_POSITIONS, config_for, random_shape, shape_from_config

GPT2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 2, "n_embd": 64, "n_head": 4,
        "vocab_size": 320, "n_positions": 512}
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "hidden_size": 64,
         "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 320,
         "max_position_embeddings": 512, "rope_theta": 500000.0}


def _folder(tmp_path, name: str, config: dict):
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def test_light_commands_import_neither_torch_nor_transformers(tmp_path):
    llama, gpt2 = _folder(tmp_path, "llama", LLAMA), _folder(tmp_path, "gpt2", GPT2)
    data = str(tmp_path / "data")
    calls = [  # (arguments, exit code, a piece of the output)
        (["--help"], 0, "estimate-memory"), (["estimate-memory", "--help"], 0, "--context"),
        (["eval-ppl", "--help"], 0, "--seqlen"), (["methods"], 0, "kvquant"), (["methods", "--json"], 0, "turbo"),
        (["estimate-memory", "--model", "random:llama-3-8b", "--context", "1M"], 0, "kvquant-2b-1%"),
        (["estimate-memory", "--model", "smollm2-135m", "-c", "64K", "--gpus", "2", "--budget", "24GB"], 0, "layers"),
        (["estimate-memory", "--model", "gemma3-270m", "--method", "turbo3", "--method", "nf4"], 0, "turbo-3b"),
        (["estimate-memory", "--model", llama, "--context", "4K", "--method", "cq", "--method", "pq", "--method",
          "kvquant:bits=2,outliers=1%", "--method", "kivi2", "--method", "int4", "--method", "fp16"], 0, "pq-d2x8b"),
        # decided by the options
        (["eval-ppl", "--method", "kvquant"], 2, "needs calibration"), (["eval-ppl", "--data-dir", "/no/dir"], 2, ""),
        (["eval-ppl", "--dataset", __file__, "--mode", "bogus"], 2, "--mode"),
        (["eval-ppl", "--dataset", __file__, "--method", "kivi2:sink=4096"], 2, "sink"),
        (["eval-ppl", "--dataset", __file__, "--device-map", "foo"], 2, "--device-map"),
        (["calibrate", "--method", "kivi2", "--samples", "0"], 2, "--samples"),
        (["calibrate", "--out", "x.txt"], 2, ".safetensors"),
        (["estimate-memory", "--method", "kivi:group=0"], 2, "group"), (["generate", "--haystack"], 2, "--context"),
        (["generate", "--model", "random:llama-3.2-1b", "-c", "1K", "--chunk", "0"], 2, "--chunk"),
        (["generate", "--model", "random:llama-3.2-1b", "-c", "1K", "--device", "tpu"], 2, "--device"),
        # decided by config.json
        (["eval-ppl", "--model", gpt2, "--dataset", __file__], 2, "no rotary position embedding"),
        (["calibrate", "--model", gpt2, "--dataset", __file__, "--data-dir", data], 2, "no rotary position embedding"),
        (["generate", "--model", gpt2, "--prompt-file", __file__], 2, "no rotary position embedding"),
    ]
    script = textwrap.dedent(f"""
        import json, sys
        from typer.testing import CliRunner
        from kvq_cli.cli import app
        from kvq_cli import api
        for args, code, piece in {calls!r}:
            res = CliRunner().invoke(app, args)
            assert res.exit_code == code and piece in res.output, (args, res.output)
            assert "Traceback" not in res.output, (args, res.output)
        names = {{m["name"] for m in api.list_methods()}}  # every registered method's metadata and accounting
        assert {{"cq", "fp16", "int", "kivi", "kvquant", "nf", "pq", "turbo"}} <= names, names
        from kvq_cli import accounting, memory, methods
        shape = memory.resolve_shape("llama-3-8b")
        for name in names:
            entry = memory.Entry.from_method(methods.make_method(name), shape)
            assert accounting.avg_bits(entry.method, shape.geometry(), 4096, entry.state_bits) > 0
        print(json.dumps([m for m in ("torch", "transformers") if m in sys.modules]))
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "KVQ_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == []


def test_config_refusals_come_before_torch(tmp_path):
    gpt2 = _folder(tmp_path, "gpt2", GPT2)
    argv = ["kvq", "eval-ppl", "--model", gpt2, "--dataset", __file__]
    script = f"import sys; from kvq_cli.cli import main; sys.argv = {argv!r}; main()"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "kvq: error: model type 'gpt2' has no rotary position embedding (no rope_theta in its configuration): kvq "
        "supports RoPE models"]


@pytest.mark.parametrize("config, message", [
    (GPT2, "no rotary position embedding"),
    ({"model_type": "t5", "is_encoder_decoder": True, "d_model": 64, "num_heads": 4}, "encoder-decoder"),
    ({"model_type": "deepseek_v3", "kv_lora_rank": 512, "rope_theta": 10000.0, "num_attention_heads": 4}, "latent"),
    ({**LLAMA, "num_key_value_heads": 3}, "not a multiple"),
])
def test_precheck_refuses_from_the_file(tmp_path, config, message):
    with pytest.raises(KvqError, match=message):
        precheck(_folder(tmp_path, "m", config))


@pytest.mark.parametrize("config", [
    {"model_type": "gpt_neox", "rotary_pct": 0.25, "num_attention_heads": 4},  # RoPE under its own names
    {"architectures": ["Unknown"]},  # no model type: transformers says what is wrong
    {**GPT2, "auto_map": {"AutoConfig": "configuration_x.XConfig"}},  # its own code decides
    LLAMA,
])
def test_precheck_leaves_what_the_file_cannot_prove(tmp_path, config):
    precheck(_folder(tmp_path, "m", config))


def _legacy(d: dict) -> dict:
    """A config.json as older transformers or hand-written files have it: RoPE theta at the top level, no layer types,
    no head_dim, no KV heads."""
    out = {k: v for k, v in d.items() if k not in ("layer_types", "head_dim", "num_key_value_heads",
                                                   "rope_parameters", "sliding_window", "tie_word_embeddings")}
    rope = d.get("rope_parameters") or {}
    if "full_attention" in rope:
        out.update(rope_theta=rope["full_attention"]["rope_theta"],
                   rope_local_base_freq=rope["sliding_attention"]["rope_theta"])
    elif "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]
    return out


SIZES = dict(num_hidden_layers=7, hidden_size=1024, num_attention_heads=32, intermediate_size=160, vocab_size=320,
             max_position_embeddings=2048)
VARIANTS = [
    ("llama", {}), ("llama", {"num_key_value_heads": 2, "tie_word_embeddings": True, "attention_bias": True}),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}}),
    ("mistral", {}), ("mistral", {"sliding_window": None}), ("mistral", {"sliding_window": 64}),
    ("qwen2", {}), ("qwen2", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 3}),
    ("qwen3", {"head_dim": 16}), ("qwen3", {"use_sliding_window": True, "sliding_window": 64, "max_window_layers": 5}),
    ("phi3", {"partial_rotary_factor": 0.75}),
    ("gemma", {}), ("gemma2", {"sliding_window": 64}),
    ("gemma3_text", {}), ("gemma3_text", {"sliding_window": 32, "num_key_value_heads": 1, "head_dim": 16}),
    ("gemma3_text", {"sliding_window_pattern": 3}),
]


@pytest.mark.parametrize("form", ["saved", "legacy", "minimal"])
@pytest.mark.parametrize("model_type, extra", VARIANTS)
def test_config_json_reads_as_transformers(tmp_path, model_type, extra, form):
    """What estimate-memory and the refusals read from config.json without transformers equals what transformers
    reads: as transformers saves it, as older files have it, and with nothing but the sizes (class defaults)."""
    from transformers import AutoConfig

    from kvq_cli.hf_attention import geometry_from_config

    AutoConfig.for_model(model_type, **SIZES, **extra).save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    raw = {"saved": saved, "legacy": {**_legacy(saved), **extra},
           "minimal": {"model_type": model_type, **SIZES, **extra}}[form]
    folder = _folder(tmp_path, "m", raw)
    expected = AutoConfig.from_pretrained(folder)
    config, exact = hf_config.json_config(json.loads(json.dumps(raw)))
    assert exact
    assert geometry_from_config(config) == geometry_from_config(expected)
    assert shape_from_config(config, "m") == shape_from_config(expected, "m")
    check_supported(config)


def test_random_presets_are_their_models_shapes():
    for name, shape in MODEL_PRESETS.items():
        spec = f"random:{name}"
        assert random_shape(name, spec) == shape_from_config(config_for(shape, RANDOM_POSITIONS), spec), name


def test_restated_sizes_agree_with_runtime_and_kernels():
    """The accounting restates two sizes of torch-importing modules (so that it imports no torch)."""
    from kvq_kernels.sparse import sparse_block

    from kvq_cli.methods.base import pointer_block
    from kvq_cli.runtime.prefill import history_block

    assert all(pointer_block(d) == sparse_block(d) for d in range(1, 8193))
    for batch in (1, 3, 64):
        for heads in (1, 9, 32, 64):
            for head_dim in (16, 64, 96, 128, 256):
                for step, quarter in ((1, False), (48, False), (32, True)):
                    assert blocks.history_block(batch, heads, head_dim, step, quarter) == history_block(
                        batch, heads, head_dim, step, quarter)
