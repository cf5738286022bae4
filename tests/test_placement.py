"""Layers over several devices: the plan, the device map, each layer's cache on its layer's device."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from typer.testing import CliRunner

from kvq_cli import load_cache, memory, placement
from kvq_cli.cli import app
from kvq_cli.errors import KvqError
from kvq_cli.generate import preflight
from kvq_cli.methods import make_method, parse_spec
from kvq_cli.presets import MODEL_PRESETS

GiB = 1 << 30


@pytest.mark.parametrize("layers, gpus", [(32, 8), (30, 4), (3, 5), (1, 1)])
def test_layer_blocks_are_contiguous_and_even(layers, gpus):
    blocks = placement.layer_blocks(layers, gpus)
    assert len(blocks) == gpus and [i for b in blocks for i in b] == list(range(layers))
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("preset", ["llama-2-7b", "llama-3.2-1b"])  # untied, tied embeddings
def test_plan_adds_up(preset):
    shape = MODEL_PRESETS[preset]
    entry = memory.Entry.from_method(parse_spec("kvquant:bits=2,outliers=0.01"), shape)
    parts = placement.plan(entry, shape, 1 << 20, 1, "bf16", 141e9, 4)
    assert [p["gpu"] for p in parts] == [0, 1, 2, 3]
    assert sum(p["weights_bytes"] for p in parts) == pytest.approx(memory.weights_bytes(shape, "bf16"))
    assert sum(p["kv_bytes"] for p in parts) == pytest.approx(memory.kv_bytes(entry, shape, 1 << 20))
    allowance = memory.allowance_bytes(shape, 1 << 20, 1, entry.method)
    for p in parts:
        assert p["total_bytes"] == pytest.approx(p["weights_bytes"] + p["kv_bytes"] + allowance)
    embed, norm = shape.vocab * shape.hidden * 2, shape.hidden * 2
    first, middle, last = (parts[i]["weights_bytes"] for i in (0, 1, -1))  # equal layer counts here
    if shape.tied_embeddings:  # the head is the embedding: the final norm joins it on the first GPU
        assert (first - middle, last - middle) == (embed + norm, 0)
    else:
        assert (first - middle, last - middle) == (embed, embed + norm)


def test_max_context_over_gpus():
    shape = MODEL_PRESETS["llama-2-7b"]
    entry = memory.Entry.from_method(parse_spec("kvquant:bits=2,outliers=0.01"), shape)
    one = placement.max_context(entry, shape, 1, "bf16", 141e9, 1)
    eight = placement.max_context(entry, shape, 1, "bf16", 141e9, 8)
    assert eight > 7 * one and eight > 10_000_000  # KVQuant's headline: 10M tokens of LLaMA-7B on 8 GPUs
    assert all(p["fits"] for p in placement.plan(entry, shape, eight, 1, "bf16", 141e9, 8))
    assert not all(p["fits"] for p in placement.plan(entry, shape, eight + 1, 1, "bf16", 141e9, 8))


def test_device_map_names_every_module():
    model = tiny_model("llama")
    cfg = model.config
    dmap = placement.device_map(cfg.num_hidden_layers, 2, bool(cfg.tie_word_embeddings), ["cpu", "meta"])
    top = {n for n, _ in model.named_modules() if n.count(".") <= 2 and n.startswith(("model.", "lm_head"))}
    assert set(dmap) == {n for n in top if n != "model.layers"}
    assert dmap["model.embed_tokens"] == "cpu" and dmap[f"model.layers.{cfg.num_hidden_layers - 1}"] == "meta"


def test_each_layer_cache_lives_on_its_layer_device():
    """A model whose second layer sits on another device (meta here: CPU machines have one real device)."""
    model = tiny_model("llama")
    method = make_method("kvquant", bits=2, fisher=False, kmeans_iters=2)
    from kvq_cli.calibration.capture import capture

    states = [method.fit(s) for s in capture(model, torch.randint(0, 300, (1, 40)), method)]
    model.model.layers[1].to("meta")
    cache = load_cache((method, states), model)
    cache.unbind()
    devices = [{t.device.type for t in layer.state16.values()} for layer in cache.layers]
    assert devices[0] == {"cpu"} and devices[1] == {"meta"}


def test_dispatched_model_evaluates_like_the_plain_one(tiny_model_dir, tiny_text_file):
    run = CliRunner().invoke
    args = ["eval-ppl", "--model", str(tiny_model_dir), "--dataset", str(tiny_text_file), "--seqlen", "32",
            "--max-windows", "2", "--method", "kivi2", "--json"]
    plain = json.loads(run(app, args).stdout)
    spread = run(app, [*args, "--device-map", "kvq"])
    assert spread.exit_code == 0, spread.output
    spread = json.loads(spread.stdout)
    for a, b in zip(plain["results"], spread["results"], strict=True):
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-5)
    bad = run(app, [*args, "--device-map", "everywhere"])
    assert bad.exit_code == 2 and "--device-map must be one of" in bad.output


def test_estimate_memory_says_which_layers_go_where():
    res = CliRunner().invoke(app, ["estimate-memory", "--model", "llama-2-7b", "--context", "10M", "--gpu", "h200",
                                   "--gpus", "8", "--method", "kvquant:bits=2,outliers=0.01", "--json"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["results"][1]
    assert row["fits"] and [p["layers"] for p in row["placement"]] == [[4 * g, 4 * g + 3] for g in range(8)]
    table = CliRunner().invoke(app, ["estimate-memory", "--model", "llama-2-7b", "--context", "10M", "--gpu", "h200",
                                     "--gpus", "8", "--method", "kvquant:bits=2,outliers=0.01"])
    assert "GPU7 layers 28-31" in table.stdout


def test_preflight_over_several_gpus():
    shape = MODEL_PRESETS["llama-2-7b"]
    entry = memory.Entry.from_method(parse_spec("kvquant:bits=2,outliers=0.01"), shape)
    assert preflight(shape, entry, 10 << 20, "bf16", 141 * 10**9, "H200", 4096, gpus=8)["estimated_bytes"] > 0
    with pytest.raises(KvqError, match="fullest GPU.*largest context that fits is"):
        preflight(shape, entry, 10 << 20, "bf16", 141 * 10**9, "H200", 4096, gpus=2)


def test_calibrate_with_a_device_map(tiny_model_dir, tiny_text_file, tmp_path):
    """Capture (with Fisher's backward pass) through accelerate's dispatch hooks gives the same artifact."""
    from kvq_cli import api
    from kvq_cli.artifact import load

    spec = parse_spec("kvquant:bits=2,outliers=0.01,kmeans_iters=3")
    kw = dict(model=str(tiny_model_dir), dataset=str(tiny_text_file), samples=2, seqlen=32)
    plain = load(api.calibrate(spec, str(tmp_path / "a.safetensors"), **kw)["artifact"])
    spread = load(api.calibrate(spec, str(tmp_path / "b.safetensors"), device_map="kvq", **kw)["artifact"])
    for a, b in zip(plain.states, spread.states, strict=True):
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5)


def test_random_model_with_a_device_map_is_made_on_its_devices():
    """``random:<preset> --device-map``: every weight is made on the device the map names (no CPU copy first,
    which took minutes for 8B on one CPU thread), with ``from_config``'s distributions, tied embeddings kept."""
    from kvq_cli.models import load_model, resolve_model

    model = load_model(resolve_model("random:smollm2-135m"), dtype="bfloat16", device_map="kvq")
    params = dict(model.named_parameters())
    assert not any(p.is_meta for p in params.values())
    std = model.config.initializer_range
    assert abs(params["model.layers.0.self_attn.q_proj.weight"].float().std().item() - std) < 0.1 * std
    assert torch.equal(params["model.norm.weight"].float(), torch.ones(model.config.hidden_size))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    again = load_model(resolve_model("random:smollm2-135m"), dtype="bfloat16", device_map="kvq")
    assert torch.equal(again.model.layers[3].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight)  # seeded
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
