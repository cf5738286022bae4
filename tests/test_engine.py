"""The decode engine (``kvq_cli.engine``): in-step sampling, the StaticCache baseline, and the graph step of the
packed cache (its device-count semantics, run eagerly on the CPU: the capture itself needs CUDA)."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import tiny_model  # noqa: E402

from kvq_cli import load_cache  # noqa: E402
from kvq_cli.engine import Decoder, Sampler, static_cache  # noqa: E402
from kvq_cli.errors import KvqError  # noqa: E402
from kvq_cli.generate import run  # noqa: E402
from kvq_cli.hf_attention import cache_kwargs  # noqa: E402
from kvq_cli.methods import parse_spec  # noqa: E402


def test_sampler_greedy_top_k_top_p():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen)
    assert torch.equal(Sampler()(logits), logits.argmax(-1))
    torch.manual_seed(1)
    assert torch.equal(Sampler(temperature=1.0, top_k=1)(logits), logits.argmax(-1))
    assert torch.equal(Sampler(temperature=1.0, top_p=1e-6)(logits), logits.argmax(-1))
    top5 = logits.topk(5, -1).indices
    draws = torch.stack([Sampler(temperature=2.0, top_k=5)(logits) for _ in range(200)], 1)  # (4, 200)
    assert all(set(draws[i].tolist()) <= set(top5[i].tolist()) for i in range(4))
    assert len(set(draws[0].tolist())) > 1  # it does sample
    # top-p keeps the smallest most-likely set reaching p
    p = torch.softmax(logits[:1], -1)[0]
    order = p.argsort(descending=True)
    keep = int((p[order].cumsum(0) < 0.5).sum()) + 1
    draws = {int(Sampler(temperature=1.0, top_p=0.5)(logits[:1])[0]) for _ in range(300)}
    assert draws <= set(order[:keep].tolist())
    torch.manual_seed(3)
    a = Sampler(temperature=0.7)(logits)
    torch.manual_seed(3)
    assert torch.equal(a, Sampler(temperature=0.7)(logits))  # seeded: reproducible
    with pytest.raises(KvqError):
        Sampler(temperature=-1.0)
    with pytest.raises(KvqError):
        Sampler(temperature=1.0, top_p=0.0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_static_cache_baseline_equals_dynamic(arch):
    """The engine's 16-bit baseline (StaticCache) generates what the model's own greedy generate does."""
    model = tiny_model(arch)
    ids = torch.randint(0, 320, (1, 29), generator=torch.Generator().manual_seed(4))
    out = run(model, static_cache(model, 1, 29 + 8), ids, max_new_tokens=8, chunk=10, eos=set())
    plain = model.generate(ids, max_new_tokens=8, do_sample=False)[0, 29:].tolist()
    assert out["new_ids"] == plain and out["eager_steps"] == 7 and out["graph_steps"] == 0


def _calibrated(model, ids, name: str, **options):
    from kvq_cli.calibration.capture import capture
    from kvq_cli.methods import make_method

    method = make_method(name, fisher=False, kmeans_iters=3, **options)
    return method, [method.fit(s) for s in capture(model, ids[:, :48], method)]


#: the calibrated methods' graph configurations (method, options)
CALIBRATED = {"kvquant-3b-2%": ("kvquant", dict(bits=3, outliers=0.02)),
              "cq-4c6b": ("cq", dict(bits=6, channels=4)),  # pre-RoPE keys, no window: a "flush" of each token
              "cq-2c5b-post-r3": ("cq", dict(bits=5, channels=2, pre_rope=False, residual=3)),
              "pq-6b-r4": ("pq", dict(bits=6, residual=4)),
              "pq-5b-r0-heads-pairs": ("pq", dict(bits=5, residual=0, head_codebooks=True, rope_pairs=True))}


STEPS = 8  # decode steps: each configuration's prompt puts a "flush" within them (interpreter kernels are slow)


#: the per-token methods' graph configurations: their tokens leave the window (or no window) one per step
TOKEN_SPECS = {"int3-r4": "int:bits=3,sink=2,residual=4", "nf4-r0": "nf:bits=4"}


@pytest.mark.parametrize("config, prompt", [("kivi-r40", 70), ("kivi-r32", 94), ("kivi-g16-r20", 45),
                                            ("kvquant-3b-2%", 40), ("int3-r4", 40), ("nf4-r0", 40),
                                            ("cq-4c6b", 40), ("cq-2c5b-post-r3", 41), ("pq-6b-r4", 40),
                                            ("pq-5b-r0-heads-pairs", 39)])
def test_graph_step_semantics_equal_eager(config, prompt):
    """What captured steps do equals the eager steps, with the Triton kernels reading the counts from the device
    and the host's counts catching up afterwards: kivi's "plain" (the token into the residual slot the device
    counts name) and "flush" (the full window's oldest group encoded into the packed store at the device's
    offset; int and nf: a group of one token, with or without a window; cq and pq: one token encoded by the method,
    cq's pre-RoPE keys with no window), kvquant's "append" (its fused append at the device's index, sparse outliers
    included). Every step after the first packed token is a graph step; the
    stored bytes are the eager path's."""
    model = tiny_model("llama")
    ids = torch.randint(0, 320, (1, prompt), generator=torch.Generator().manual_seed(6))
    kivi = config.startswith("kivi")
    group = 16 if "-g16" in config else 32
    if kivi:
        spec = parse_spec(f"kivi:bits=2,group={group},residual={config[-2:]}")
    elif config in TOKEN_SPECS:
        spec = parse_spec(TOKEN_SPECS[config])
    else:
        name, options = CALIBRATED[config]
        spec = _calibrated(model, ids, name, **options)
    expected = {"plain", "flush"} if kivi else {"append"} if config.startswith("kvquant") else {"flush"}
    logits = []
    for graph_mode in (False, True):
        cache = load_cache(spec, model, max_tokens=120)
        for layer in cache.layers:
            layer.use_kernel = True
        assert all(layer.graph_capable() for layer in cache.layers)
        dec = Decoder(model, cache, graphs=False)
        token = dec.prefill(ids, 32)
        steps, graph_steps, kinds = [], 0, set()
        with torch.inference_mode():
            for _ in range(STEPS):
                pos = torch.tensor([[dec.position]])
                kind = cache.graph_kind()
                if graph_mode and kind is not None:
                    cache.enter_graph_step(kind)
                    out = model(input_ids=token[:, None], position_ids=pos, **cache_kwargs(model, cache)).logits
                    cache.graph_step_done(kind)
                    graph_steps += 1
                    kinds.add(kind)
                else:
                    out = model(input_ids=token[:, None], position_ids=pos, **cache_kwargs(model, cache)).logits
                dec.position += 1
                token = out[:, -1].argmax(-1)
                steps.append(out[:, -1])
        cache.unbind()
        if graph_mode:
            assert graph_steps == STEPS and kinds == expected
            assert cache.decode_steps() == {"kernel_steps": STEPS * len(cache.layers), "reference_steps": 0,
                                            "reference_reason": None}
            layer = cache.layers[0]
            assert layer.length == prompt + STEPS  # the prompt and the tokens fed back
            for stream in (layer.keys_stream, layer.values_stream):
                assert len(stream) == layer.length and stream.packed.n % (group if kivi else 1) == 0
                assert all(f.n * (1 if name == "codes" else stream.packed.step) >= stream.packed.n
                           for name, f in stream.packed.fields.items())
            stored = [layer.read(0, layer.length) for layer in cache.layers]
        else:
            eager = [layer.read(0, layer.length) for layer in cache.layers]
        logits.append(torch.stack(steps))
    assert (logits[0] - logits[1]).abs().max().item() < 1e-4
    for (k1, v1), (k2, v2) in zip(eager, stored, strict=True):  # the same bytes came out of both paths
        assert torch.equal(k1, k2) and torch.equal(v1, v2)


@pytest.mark.parametrize("name, options", [("cq", dict(bits=4, residual=2)), ("pq", dict(bits=4, outliers=0.01))])
def test_vq_graph_steps_refuse_what_their_kernels_do_not_hold(name, options):
    """No graph step for pre-RoPE cq keys with a residual window, nor for cq / pq with sparse outliers: their
    layers decode eagerly (``vq_refusal`` names the outliers)."""
    from kvq_cli.runtime.kernel_path import vq_refusal

    model = tiny_model("llama")
    ids = torch.randint(0, 320, (1, 48), generator=torch.Generator().manual_seed(7))
    cache = load_cache(_calibrated(model, ids, name, **options), model, max_tokens=120)
    for layer in cache.layers:
        layer.use_kernel = True
        assert not layer.graph_capable()
        assert (vq_refusal(layer) is not None) == bool(options.get("outliers"))
    cache.unbind()


def test_graphs_refused_on_cpu():
    model = tiny_model("llama")
    with pytest.raises(KvqError, match="CUDA"):
        Decoder(model, load_cache(parse_spec("kivi2"), model, max_tokens=64), graphs=True)
