"""``turbo`` (TurboQuant-MSE): Lloyd-Max levels, the rotation, round trips, bit accounting, evaluation and runtime."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from kvq_cli import load_cache
from kvq_cli.accounting import avg_bits
from kvq_cli.errors import KvqError
from kvq_cli.hf_attention import KVGeometry, cache_kwargs, geometry_from_config
from kvq_cli.methods import make_method, parse_spec
from kvq_cli.methods.turbo import lloyd_max_normal, rotation
from kvq_cli.perplexity import Configuration, evaluate
from kvq_cli.runtime.cache import check_runtime
from kvq_cli.runtime.stream import streaming_logits
from kvq_cli.simulate import simulated

#: Max (1960), Table I: the positive Lloyd-Max levels of N(0, 1) at 1-4 bits.
MAX_1960 = {1: [0.7979], 2: [0.4528, 1.510], 3: [0.2451, 0.7560, 1.344, 2.152],
            4: [0.1284, 0.3881, 0.6568, 0.9424, 1.256, 1.618, 2.069, 2.733]}


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_lloyd_max_levels_are_the_published_ones(bits):
    levels = lloyd_max_normal(bits)
    assert levels.shape == (1 << bits,) and torch.equal(levels, levels.sort().values)
    assert torch.allclose(levels, -levels.flip(0))  # symmetric
    torch.testing.assert_close(levels[1 << (bits - 1):], torch.tensor(MAX_1960[bits]), rtol=0, atol=1.5e-3)


def test_rotation_is_orthogonal_deterministic_and_seeded():
    q = rotation(64, 0)
    torch.testing.assert_close(q @ q.T, torch.eye(64), rtol=0, atol=1e-6)
    assert torch.equal(q, rotation(64, 0)) and not torch.equal(q, rotation(64, 1))
    assert q.abs().unique().tolist() == [0.125]  # a signed Hadamard: every entry +-1/sqrt(D)
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close((x @ q.T).norm(dim=-1), x.norm(dim=-1))
    # the same method encodes the same way on every call and every instance
    k = torch.randn(1, 2, 7, 64, generator=torch.Generator().manual_seed(1))
    first, again = (make_method("turbo").encode_keys(k, {})["codes"] for _ in range(2))
    assert torch.equal(first, again)


def _heavy(shape, seed):
    """Student-t(5) entries with per-channel scales: outlier channels, as real keys have."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(shape[-1], generator=g))
    return torch.distributions.StudentT(torch.tensor(5.0)).sample(shape) * scale


def test_round_trip_error_falls_with_bits():
    x = _heavy((2, 2, 128, 64), 0)
    errors = []
    for bits in (1, 2, 3, 4):
        m = make_method("turbo", bits=bits)
        enc = m.encode_keys(x, {})
        assert enc["codes"].dtype == torch.uint8 and int(enc["codes"].max()) < 1 << bits
        assert enc["scale"].dtype == torch.float16 and enc["scale"].shape == (2, 2, 128, 1)
        out = m.decode_keys(enc, {})
        errors.append(((out - x).norm() / x.norm()).item())
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.15
    # isotropic vectors: the rotated, norm-scaled coordinates are N(0, 1), so the relative squared error is Lloyd-Max's
    # MSE on N(0, 1): 0.3634 at 1 bit, 0.1175 at 2, 0.03454 at 3, 0.009497 at 4
    g = torch.randn(2, 2, 128, 64, generator=torch.Generator().manual_seed(3))
    for bits, mse in zip((1, 2, 3, 4), (0.3634, 0.1175, 0.03454, 0.009497), strict=True):
        m = make_method("turbo", bits=bits)
        rel = ((m.decode_keys(m.encode_keys(g, {}), {}) - g).norm(dim=-1) / g.norm(dim=-1)).square().mean()
        assert rel.item() == pytest.approx(mse, rel=0.05)


def test_zero_vector_and_fp16_norm():
    m = make_method("turbo", bits=2)
    x = torch.zeros(1, 1, 2, 16)
    x[0, 0, 1] = 1e6  # norm beyond fp16: saturated, never inf
    enc = m.encode_keys(x, {})
    out = m.decode_keys(enc, {})
    assert torch.isfinite(out).all() and torch.equal(out[0, 0, 0], torch.zeros(16))


def test_bits_accounting():
    m = parse_spec("turbo3")
    assert (m.name, m.bits, m.label) == ("turbo", 3, "turbo-3b")
    x = _heavy((2, 2, 50, 64), 1)
    exact = m.encoded_bits(m.encode_keys(x, {})) + m.encoded_bits(m.encode_values(x, {}))
    assert exact / (2 * 50) == m.bits_per_token(2, 64) == 2 * 2 * (64 * 3 + 16)  # batch 2, 50 tokens, K and V
    geom = _geometry(64)
    assert avg_bits(m, geom, 1000) == pytest.approx(3 + 16 / 64)  # b per element + 16 per vector, no state
    assert avg_bits(make_method("turbo", bits=2, sink=4), geom, 1000) == pytest.approx((4 * 16 + 996 * 2.25) / 1000)


def _geometry(head_dim: int) -> KVGeometry:
    return KVGeometry(layers=3, kv_heads=2, head_dim=head_dim, q_heads=4, rope_theta=10000.0, max_positions=4096,
                      architecture="LlamaForCausalLM")


def test_head_dim_not_a_power_of_two_is_refused():
    with pytest.raises(KvqError, match="power of two"):
        make_method("turbo").bits_per_token(2, 96)
    with pytest.raises(KvqError, match="turbo needs a head_dim that is a power of two"):
        check_runtime(make_method("turbo"), _geometry(96))
    with pytest.raises(KvqError, match="supports bits"):
        make_method("turbo", bits=5)


def test_eval_simulated_and_streaming_on_a_tiny_model():
    model = tiny_model("llama")  # head_dim 16
    wins = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    configs = [Configuration(f"turbo{b}", make_method("turbo", bits=b)) for b in (1, 2, 4)]
    base, *rows = evaluate(model, wins, configs)
    kls, top1 = [r["kl_divergence"] for r in rows], [r["top1_agreement"] for r in rows]
    assert kls == sorted(kls, reverse=True) and 0 < kls[-1] < 0.1 and top1 == sorted(top1) and top1[0] < top1[-1]
    # the packed runtime stores what encode returns: streaming as stored equals simulated
    m = make_method("turbo", bits=3)
    with torch.no_grad(), simulated(model, m, None):
        sim = model(wins).logits
    stream = streaming_logits(model, wins, m, None, chunk=9, full_chunk=False)
    torch.testing.assert_close(stream, sim, rtol=0, atol=1e-4)


def test_generate_through_the_packed_cache():
    model = tiny_model("qwen2")
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(2))
    m = make_method("turbo", bits=4)
    cache = load_cache(m, model, max_tokens=40)
    try:
        out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=10, do_sample=False)
    finally:
        cache.unbind()
    assert out.shape == (1, 30)
    geom = geometry_from_config(model.config)
    assert cache.nbytes() * 8 == pytest.approx(avg_bits(m, geom, 29) * geom.layers * 2 * 2 * 16 * 29, rel=0.01)
    layer = cache.layers[0]
    assert layer.reference_steps > 0 and layer.kernel_steps == 0  # no Triton kernel for turbo: the reference path
