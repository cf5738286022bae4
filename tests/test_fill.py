"""``Decoder.fill`` / ``kvq generate --fill random``: a long context of random keys and values appended through the
cache's own path without running the model, then decoding on top of it."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import tiny_model  # noqa: E402

from kvq_cli import load_cache  # noqa: E402
from kvq_cli.engine import Decoder, static_cache  # noqa: E402
from kvq_cli.errors import KvqError  # noqa: E402
from kvq_cli.generate import generate, run  # noqa: E402
from kvq_cli.methods import parse_spec  # noqa: E402


@pytest.mark.parametrize("spec", ["kivi2", "int4"])
def test_fill_appends_through_the_packed_cache(spec):
    """Every layer holds the filled positions (packed where the method packs them), and decoding continues on top:
    the first token after the fill equals a prefill of the same last token onto the same cache contents."""
    model = tiny_model("llama")
    ids = torch.randint(0, 320, (1, 201), generator=torch.Generator().manual_seed(5))
    cache = load_cache(parse_spec(spec), model, max_tokens=210)
    out = run(model, cache, ids, max_new_tokens=4, chunk=64, eos=set(), fill=200)
    assert all(layer.length == 201 + 3 for layer in cache.layers)
    assert cache.layers[0].keys_stream.packed.n > 0  # the fill reached the packed store
    assert len(out["new_ids"]) == 4 and out["fill_seconds"] >= 0
    # the same random contents (same seed), then the last token prefilled: the same first token
    again = load_cache(parse_spec(spec), model, max_tokens=210)
    dec = Decoder(model, again)
    dec.fill(200, 64)
    assert dec.position == 200
    assert int(dec.prefill(ids[:, 200:], 32)[0]) == out["new_ids"][0]


def test_fill_static_cache_positions():
    """The 16-bit StaticCache takes the fill at positions 0..N-1: the model then decodes at position N."""
    model = tiny_model("llama")
    cache = static_cache(model, 1, 40)
    dec = Decoder(model, cache, graphs=False)
    dec.fill(30, 16)
    k = cache.layers[0].keys  # (1, H, 40, D)
    assert k[:, :, :30].abs().sum(-1).gt(0).all() and k[:, :, 30:].abs().sum() == 0
    tok = dec.prefill(torch.tensor([[3]]), 16)
    assert dec.position == 31 and tok.shape == (1,)


@pytest.mark.parametrize("kw", [dict(fill="zeros", context=64), dict(fill="random"),
                                dict(fill="random", context=64, haystack=True)])
def test_fill_refusals(kw):
    with pytest.raises(KvqError):
        generate(model="random:llama-3.2-1b", method=parse_spec("kivi2"), **kw)
