"""Calibration capture (exact thresholds, Fisher information) and artifacts (identity, every refusal)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from kvq_cli import artifact as artifact_io
from kvq_cli.calibration.capture import capture, sample_windows
from kvq_cli.errors import KvqError
from kvq_cli.hf_attention import attention_layers, geometry_from_config, split_heads
from kvq_cli.methods import make_method


def _all_pre_rope_keys_and_grads(model, ids, layer=0):
    """Reference: every pre-RoPE key of one layer and the squared gradient of the mean loss, by plain autograd."""
    attn = attention_layers(model)[layer]
    keys, grads = [], []

    def hook(m, i, out):
        out.retain_grad()
        keys.append(out)

    h = attn.k_proj.register_forward_hook(hook)
    for p in model.parameters():
        p.requires_grad_(False)
    for row in ids:
        emb = model.get_input_embeddings()(row[None]).detach().requires_grad_()
        model(inputs_embeds=emb, labels=row[None]).loss.backward()
        grads.append(keys[-1].grad)
    h.remove()
    k = torch.cat([split_heads(x.detach(), attn.head_dim) for x in keys], dim=2)  # (1, H, S*T, D)
    g = torch.cat([split_heads(x, attn.head_dim) for x in grads], dim=2)
    return k[0], g[0].square()


@pytest.mark.parametrize("fraction", [0.0, 0.1])
def test_thresholds_are_exact_quantiles(fraction):
    model = tiny_model("llama")
    ids = torch.randint(0, 320, (3, 40), generator=torch.Generator().manual_seed(3))
    method = make_method("kvquant", bits=2, outliers=fraction, sink=1)
    stats = capture(model, ids, method, max_tokens=30)
    ref, _ = _all_pre_rope_keys_and_grads(model, ids, layer=1)  # layer 0's keys repeat with their tokens (ties)
    ref = ref.view(ref.shape[0], 3, 40, -1)[:, :, 1:].reshape(ref.shape[0], -1, ref.shape[-1])  # drop sink
    n = ref.shape[1]
    k = int(torch.tensor(fraction / 2 * n).ceil())
    srt = ref.sort(dim=1).values  # (H, N, D)
    torch.testing.assert_close(stats[1].key_hi, srt[:, n - 1 - k])
    torch.testing.assert_close(stats[1].key_lo, srt[:, k])
    assert stats[1].tokens == n
    outside = ((ref > stats[1].key_hi[:, None]) | (ref < stats[1].key_lo[:, None])).float().mean().item()
    assert outside == pytest.approx(2 * k / n) and abs(outside - fraction) <= 2 / n  # ceil(f/2 n) each side


def test_fisher_is_squared_gradient_of_sampled_tokens():
    model = tiny_model("qwen2")
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(4))
    method = make_method("kvquant", bits=3, outliers=0.0, sink=0)
    (layer0, *_) = capture(model, ids, method, max_tokens=10_000)  # keeps every token
    keys, fisher = _all_pre_rope_keys_and_grads(model, ids)
    torch.testing.assert_close(layer0.keys, keys.transpose(0, 1))
    torch.testing.assert_close(layer0.key_fisher, fisher.transpose(0, 1), rtol=1e-4, atol=1e-12)
    assert layer0.value_fisher.shape == layer0.values.shape and layer0.value_fisher.sum() > 0


def test_subsample_size_and_no_weight_gradients():
    model = tiny_model("mistral")
    ids = torch.randint(0, 320, (4, 32))
    stats = capture(model, ids, make_method("kvquant", bits=2), max_tokens=40)
    assert all(s.keys.shape[0] == 40 and s.values.shape == s.keys.shape for s in stats)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


def test_too_little_text():
    with pytest.raises(KvqError, match="too little"):
        sample_windows(torch.arange(100), samples=4, seqlen=32)
    assert sample_windows(torch.arange(100), samples=3, seqlen=32).shape == (3, 32)


# ---- artifacts ----------------------------------------------------------------------------------
@pytest.fixture
def art():
    model = tiny_model("llama")
    geom = geometry_from_config(model.config)
    method = make_method("kvquant", bits=3, outliers=0.01)
    lo = -torch.rand(2, 16) - 0.5
    book = torch.linspace(-1, 1, 8)
    states = [{"key_codebook": book, "value_codebook": book, "key_lo": lo, "key_hi": lo + 1}
              for _ in range(geom.layers)]
    return artifact_io.Artifact(method, states, artifact_io.fingerprint(geom), {"dataset": "x", "samples": 2}), geom


def test_artifact_round_trip(art, tmp_path):
    a, geom = art
    path = artifact_io.save(a, tmp_path / "a.safetensors")
    b = artifact_io.load(path)
    assert b.method == a.method and b.model == a.model and b.calibration == a.calibration
    for sa, sb in zip(a.states, b.states, strict=True):
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    b.check_model(geom)
    assert [p.name for p in tmp_path.iterdir()] == ["a.safetensors"]  # no temporary file left


def test_artifact_refusals(art, tmp_path):
    from safetensors.torch import save_file

    a, geom = art
    path = artifact_io.save(a, tmp_path / "a.safetensors")
    other = tiny_model("llama", num_key_value_heads=4)
    with pytest.raises(KvqError, match="another model"):
        artifact_io.load(path).check_model(geometry_from_config(other.config))
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(KvqError, match="corrupt or truncated"):
        artifact_io.load(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(KvqError, match="corrupt or truncated"):
        artifact_io.load(tmp_path / "junk.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(KvqError, match="not a kvq artifact"):
        artifact_io.load(tmp_path / "plain.safetensors")
    meta = {"schema_version": 99, "method": {"method": "fp16"}}  # read before anything else
    save_file({"x": torch.zeros(1)}, tmp_path / "future.safetensors", metadata={"kvq": json.dumps(meta)})
    with pytest.raises(KvqError, match="schema version 99"):
        artifact_io.load(tmp_path / "future.safetensors")


def test_interrupted_save_leaves_nothing(art, tmp_path, monkeypatch):
    a, _ = art

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("safetensors.torch.save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        artifact_io.save(a, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []
