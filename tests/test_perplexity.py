"""The evaluation loop against plain transformers loops, and simulated quantization plumbing."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_model

from kvq_cli.hf_attention import attention_layers, geometry_from_config
from kvq_cli.methods import make_method
from kvq_cli.perplexity import Configuration, evaluate
from kvq_cli.simulate import simulated


def _windows(n=3, t=48, seed=1):
    return torch.randint(0, 320, (n, t), generator=torch.Generator().manual_seed(seed))


def test_baseline_matches_labels_loop(arch):
    model = tiny_model(arch)
    wins = _windows()
    (row,) = evaluate(model, wins, [], batch_size=2)
    with torch.no_grad():
        losses = [model(w[None], labels=w[None]).loss.item() for w in wins]
    assert row["perplexity"] == pytest.approx(math.exp(sum(losses) / len(losses)), rel=1e-5)
    assert row["kl_divergence"] == 0 and row["top1_agreement"] == 1


@pytest.mark.parametrize("pre_rope", [False, True])
def test_fp16_configuration_is_near_baseline(arch, pre_rope):
    model = tiny_model(arch)
    method = make_method("fp16", pre_rope=pre_rope)
    base, q = evaluate(model, _windows(), [Configuration("fp16", method)])
    assert q["perplexity"] == pytest.approx(base["perplexity"], rel=1e-3)
    assert 0 <= q["kl_divergence"] < 1e-4
    assert q["top1_agreement"] > 0.97


class _Spy:
    """A method that records what it is asked to quantize and changes nothing."""

    def __init__(self, pre_rope, sink=0):
        self.seen_keys, self.seen_values = [], []
        self.keys_pre_rope, self.sink = pre_rope, sink

    def for_layer(self, index):
        return self

    def fake_quant_keys(self, k, state):
        self.seen_keys.append(k.clone())
        return k

    def fake_quant_values(self, v, state):
        self.seen_values.append(v.clone())
        return v


@pytest.mark.parametrize("pre_rope", [False, True])
def test_hooks_see_every_layer_with_right_shapes_and_sink(pre_rope):
    model = tiny_model("llama")
    geom = geometry_from_config(model.config)
    spy = _Spy(pre_rope, sink=3)
    ids = _windows(1, 20)
    with torch.no_grad():
        ref = model(ids).logits
        with simulated(model, spy, None):
            out = model(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    assert len(spy.seen_keys) == len(spy.seen_values) == geom.layers
    assert spy.seen_keys[0].shape == (1, geom.kv_heads, 20 - 3, geom.head_dim)
    assert model.config._attn_implementation != "kvq"  # restored
    assert not any(hasattr(m, "_kvq_state") for m in attention_layers(model))


def test_pre_rope_keys_are_the_projection_outputs():
    model = tiny_model("qwen2")
    spy = _Spy(True)
    ids = _windows(1, 12)
    captured = []
    layer0 = attention_layers(model)[0]
    handle = layer0.k_proj.register_forward_hook(lambda m, i, o: captured.append(o.detach().clone()))
    with torch.no_grad(), simulated(model, spy, None):
        model(ids)
    handle.remove()
    k = captured[0].view(1, 12, -1, layer0.head_dim).transpose(1, 2)
    torch.testing.assert_close(spy.seen_keys[0], k)


def test_quantization_changes_the_output():
    """A destructive method must move perplexity: the hooks are really in the forward pass."""
    model = tiny_model("mistral")

    class Zero(_Spy):
        def fake_quant_values(self, v, state):
            return torch.zeros_like(v)

    base, q = evaluate(model, _windows(), [Configuration("zero-v", Zero(False))])
    assert q["kl_divergence"] > 1e-3


def test_pre_rope_fp16_then_rope_gives_the_models_own_keys():
    """Quantizing pre-RoPE keys at 16 bits, then RoPE, gives the keys attention would see unquantized."""
    model = tiny_model("llama")
    ids = _windows(1, 30)
    seen = {}

    class Record(_Spy):
        def fake_quant_keys(self, k, state):
            return make_method("fp16", pre_rope=True).fake_quant_keys(k, state)

    def grab(tag):
        def transform(module, key, value):
            if module.layer_idx == 0:  # layer 0: its input is not affected by quantization upstream
                seen[tag] = key.detach().clone()
            return key, value

        return transform

    from kvq_cli.hf_attention import attached, kvq_attention

    layers = attention_layers(model)
    with torch.no_grad(), kvq_attention(model), attached(layers, "_kvq_transform", [grab("plain")] * len(layers)):
        model(ids)
    method = Record(True)
    with torch.no_grad(), simulated(model, method, None):
        # simulated() installs its own transform; read the post-RoPE keys through a wrapper
        inner = layers[0]._kvq_transform
        layers[0]._kvq_transform = lambda m, k, v: (seen.__setitem__("quant", k.detach().clone()), inner(m, k, v))[1]
        model(ids)
    torch.testing.assert_close(seen["quant"], seen["plain"], rtol=1e-3, atol=1e-3)  # fp16 rounding only
    assert not torch.equal(seen["quant"], seen["plain"])  # it did go through 16-bit storage
