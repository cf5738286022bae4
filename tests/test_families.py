"""The model families users run, on tiny random models: Llama 3 RoPE scaling, Qwen3 (QK-norm), Mistral with a
sliding window, Gemma 2 (softcapping, alternating windows), Gemma 3 (per-layer RoPE, k_norm after the transpose)
and Phi-3 (fused qkv_proj, head_dim 96, partial rotary). Eval, calibrate and generate work on each; refusals come
from the configuration alone."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import VOCAB
from typer.testing import CliRunner

from kvq_cli import load_cache
from kvq_cli.accounting import cache_bits, layer_bits
from kvq_cli.calibration.capture import capture
from kvq_cli.cli import app
from kvq_cli.errors import KvqError
from kvq_cli.hf_attention import attention_layers, cache_kwargs, geometry_from_config, pre_rope_hooks
from kvq_cli.methods import make_method
from kvq_cli.models import check_supported
from kvq_cli.perplexity import Configuration, evaluate
from kvq_cli.runtime.attention import Rope, dense_attention
from kvq_cli.runtime.kernel_path import reference_reason
from kvq_cli.runtime.stream import streaming_logits
from kvq_cli.runtime.window import WindowLayer

COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
WINDOW = 8
GEMMA_LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def family_config(name: str):
    import transformers as tf

    four = {**COMMON, "num_hidden_layers": 4}
    if name == "llama3":
        return tf.LlamaConfig(**COMMON, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    if name == "qwen3":
        return tf.Qwen3Config(**COMMON, head_dim=16)
    if name == "mistral":
        return tf.MistralConfig(**COMMON, sliding_window=WINDOW)
    if name == "gemma2":
        return tf.Gemma2Config(**four, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16,
                               attn_logit_softcapping=5.0, final_logit_softcapping=30.0, layer_types=GEMMA_LAYERS)
    if name == "gemma3":
        return tf.Gemma3TextConfig(**{**four, "num_key_value_heads": 1}, head_dim=16, sliding_window=WINDOW,
                                   query_pre_attn_scalar=16, layer_types=GEMMA_LAYERS, rope_parameters={
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                       "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}})
    assert name == "phi3"  # head_dim 192 / 2 = 96, RoPE on 72 of its channels
    return tf.Phi3Config(**{**COMMON, "hidden_size": 192, "num_attention_heads": 2, "num_key_value_heads": 1},
                         partial_rotary_factor=0.75)


FAMILIES = ["llama3", "qwen3", "mistral", "gemma2", "gemma3", "phi3"]


def family_model(name: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config(name), dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so attention is far from uniform
        for pname, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in pname:
                p.mul_(4.0)
    return model.eval()


def _ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))  # no pad / bos / eos


def _kvquant(model, bits: int = 4):
    method = make_method("kvquant", bits=bits, fisher=True, kmeans_iters=3)
    return method, [method.fit(s) for s in capture(model, _ids(2, 32, seed=1), method)]


@pytest.mark.parametrize("name", FAMILIES)
def test_eval_calibrate_generate(name):
    """Simulated eval (pre-RoPE fp16 equals the baseline; kvquant and int4 run), calibration capture, streaming
    through the packed cache (the 16-bit cache equals the model's own forward), and greedy generation past the
    sliding window equal to transformers' own cache."""
    model = family_model(name)
    ids = _ids(1, 40)
    method, states = _kvquant(model)
    rows = evaluate(model, ids, [Configuration("fp16", make_method("fp16", pre_rope=True)),
                                 Configuration("kvquant", method, states), Configuration("int4", make_method("int"))])
    assert rows[1]["kl_divergence"] < 1e-6 and all(math.isfinite(r["perplexity"]) for r in rows)
    with torch.no_grad():
        plain = model(ids, use_cache=False).logits
    stored = streaming_logits(model, ids, make_method("fp16", pre_rope=True), None, chunk=7)
    assert (stored - plain).abs().max() < 1e-2  # fp16 storage of K/V
    streamed = streaming_logits(model, ids, method, states, chunk=7)
    assert torch.isfinite(streamed).all()
    prompt = ids[:, :12]
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False)
    cache = load_cache(make_method("fp16", pre_rope=True), model)
    try:
        out = model.generate(prompt, **cache_kwargs(model, cache), max_new_tokens=12, do_sample=False)
    finally:
        cache.unbind()
    assert torch.equal(out, expected)
    steps = cache.decode_steps()
    assert steps["reference_steps"] == 11 * len(cache.layers) and steps["reference_reason"]


@pytest.mark.parametrize("name", ["qwen3", "gemma3", "phi3", "llama3"])
def test_pre_rope_keys_are_the_models(name):
    """The hooks hand over the key the model rotates, in (B, H, T, D), whatever the k_norm / transpose order or a
    fused qkv_proj; rotated by the runtime's per-layer Rope they equal the keys attention receives."""
    model = family_model(name)
    layers = attention_layers(model)
    pre, post, handles = {}, {}, []
    for attn in layers:
        handles += pre_rope_hooks(attn, lambda out, heads, i=attn.layer_idx: pre.__setitem__(i, heads(out).clone()))
    from kvq_cli.hf_attention import attached, kvq_attention

    def seen(module, key, value):
        post[module.layer_idx] = key.clone()
        return key, value

    try:
        with torch.no_grad(), kvq_attention(model), attached(layers, "_kvq_transform", [seen] * len(layers)):
            model(_ids(1, 9), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    from kvq_cli.hf_attention import layer_rope_key

    ropes = Rope.layers(model, [layer_rope_key(model.config, i) for i in range(len(layers))])
    for i, rope in enumerate(ropes):
        assert pre[i].shape == post[i].shape == (1, model.config.num_key_value_heads, 9, layers[i].head_dim)
        torch.testing.assert_close(rope.apply(pre[i], torch.arange(9)), post[i], rtol=1e-5, atol=1e-5)


def test_gemma3_geometry_and_rope_per_layer_type():
    model = family_model("gemma3")
    geom = geometry_from_config(model.config)
    assert geom.rope_theta == {"sliding_attention": 10000.0, "full_attention": 1000000.0}
    assert geom.windows == (WINDOW, None, WINDOW, None)
    sliding, full = Rope.layers(model, ["sliding_attention", "full_attention"])
    assert not torch.equal(sliding.inv_freq, full.inv_freq)
    torch.testing.assert_close(full.inv_freq, 1.0 / 1e6 ** (torch.arange(0, 16, 2).float() / 16))


def test_gemma3_artifact_records_both_thetas(tmp_path):
    from kvq_cli import artifact

    model = family_model("gemma3")
    method, states = _kvquant(model, bits=3)
    geom = geometry_from_config(model.config)
    path = artifact.save(artifact.Artifact(method, states, artifact.fingerprint(geom)), tmp_path / "g3.safetensors")
    loaded = artifact.load(path, geom)
    assert loaded.model["rope_theta"] == {"sliding_attention": 10000.0, "full_attention": 1000000.0}
    other = geometry_from_config(family_config("gemma3").__class__(**{
        **family_config("gemma3").to_dict(), "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0}}}))
    assert "rope_theta" in loaded.mismatch(other)


def test_window_layer_keeps_its_window_and_attends_within_it():
    torch.manual_seed(0)
    layer = WindowLayer(0, 1, window=5, max_tokens=None)
    layer.attn = type("A", (), {})()
    layer.attn._kvq_layer = layer
    keys, values = torch.randn(1, 2, 13, 8), torch.randn(1, 2, 13, 8)
    query = torch.randn(1, 4, 13, 8)
    outs = []
    for a, b in [(0, 6), (6, 7), (7, 13)]:  # a prefill chunk, a decode token, another chunk
        layer.update(keys[:, :, a:b], values[:, :, a:b])
        outs.append(layer.attend(query[:, :, a:b], 0.3, (keys[:, :, a:b], values[:, :, a:b])))
        assert layer.keys.shape[2] == min(b, 5)
    ref = dense_attention(query, keys.half().float(), values.half().float(), 0.3, window=5)
    torch.testing.assert_close(torch.cat(outs, 2), ref, rtol=2e-3, atol=2e-3)
    assert layer.nbytes() == 2 * 5 * 2 * 8 * 2  # K and V, 5 tokens, 2 heads, 8 channels, fp16


def test_softcap_in_reference_attention():
    from kvq_cli.runtime.attention import blockwise_attention

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 6, 8) * 4, torch.randn(1, 2, 20, 8) * 4, torch.randn(1, 2, 20, 8)
    ref = dense_attention(q, k, v, 0.5, softcap=2.0)
    got = blockwise_attention(q, lambda a, b: (k[:, :, a:b], v[:, :, a:b]), 20, 0.5, [(0, 7), (7, 14), (14, 20)], 2.0)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(dense_attention(q, k, v, 0.5), ref, atol=1e-3)


def test_kernel_path_reasons():
    """Layers the Triton kernels cannot express go to the reference path with a reason (never a wrong result)."""
    model = family_model("gemma2")
    cache = load_cache(make_method("kivi", bits=2, group=32), model)
    try:
        for layer in cache.layers:
            layer.use_kernel = True
        reasons = [reference_reason(layer) for layer in cache.layers]
    finally:
        cache.unbind()
    assert "sliding-window" in reasons[0] and "softcapping" in reasons[1]
    model = family_model("phi3")
    method, states = _kvquant(model)
    cache = load_cache((method, states), model)
    try:
        cache.layers[0].use_kernel = True
        assert "power of two" in reference_reason(cache.layers[0])
    finally:
        cache.unbind()


def test_memory_counts_window_layers():
    geom = geometry_from_config(family_config("gemma3"))
    method = make_method("int", bits=4)
    full = geometry_from_config(family_config("gemma2").__class__(**{**family_config("gemma2").to_dict(),
                                                                     "layer_types": ["full_attention"] * 4}))
    assert full.windows is None
    ring = 2 * WINDOW * 1 * 16 * 16  # K and V, the window, 1 KV head, head_dim 16, fp16
    assert cache_bits(method, geom, 1000) == 2 * ring + 2 * layer_bits(method, 1, 16, 1000)
    assert cache_bits(method, geom, 4) == 4 * layer_bits(make_method("fp16"), 1, 16, 4) - 2 * layer_bits(
        make_method("fp16"), 1, 16, 4) + 2 * layer_bits(method, 1, 16, 4)  # within the window: fp16 rings


@pytest.mark.parametrize("config, message", [
    (dict(model_type="gpt2"), "no rotary position embedding"),
    (dict(model_type="deepseek_v3", kv_lora_rank=512, rope_theta=10000.0), "latent"),
])
def test_refusals_from_the_config(config, message):
    from transformers import PretrainedConfig

    cfg = PretrainedConfig(num_attention_heads=4, **{k: v for k, v in config.items() if k != "model_type"})
    cfg.model_type = config["model_type"]
    with pytest.raises(KvqError, match=message):
        check_supported(cfg)
    for name in FAMILIES:
        check_supported(family_config(name))  # no refusal


# ---- the CLI on a saved tiny Gemma 3 (the flow of issue 18's "done when") ----------------------------------------
runner = CliRunner()


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory, tiny_tokenizer):
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    family_model("gemma3").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def test_cli_calibrate_eval_generate_gemma3(gemma3_dir, tiny_text_file, tmp_path):
    art = tmp_path / "g3.safetensors"
    res = runner.invoke(app, ["calibrate", "--model", str(gemma3_dir), "--dataset", str(tiny_text_file), "--samples",
                              "2", "--seqlen", "48", "--method", "kvquant", "--bits", "3", "--outliers", "0.01",
                              "--out", str(art), "--json"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval-ppl", "--model", str(gemma3_dir), "--dataset", str(tiny_text_file), "--seqlen",
                              "48", "--max-windows", "2", "--artifact", str(art), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["results"]
    assert rows[0]["name"] == "baseline" and math.isfinite(rows[1]["perplexity"])
    prompt = tmp_path / "p.txt"
    prompt.write_text(tiny_text_file.read_text()[:400])
    res = runner.invoke(app, ["generate", "--model", str(gemma3_dir), "--artifact", str(art), "--prompt-file",
                              str(prompt), "--context", "40", "--max-new-tokens", "4", "--chunk", "16", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["prompt_tokens"] == 40 and "sliding-window" in doc["reference_reason"]
