"""Model and text-source resolvers: local sources, caching, and one clear error for each mistake."""

from __future__ import annotations

import pytest
import torch
from conftest import SHARED_DATA

from kvq_cli.data import load_text, tokenize, windows
from kvq_cli.errors import KvqError
from kvq_cli.models import load_config, resolve_model


def test_local_folder_resolves(tiny_model_dir):
    src = resolve_model(str(tiny_model_dir))
    assert src.path == str(tiny_model_dir) and src.gguf_file is None
    assert load_config(src).num_key_value_heads == 2


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no-such-alias", "unknown model"),
        ("./missing/folder", "not a Hugging Face folder"),
        ("missing.gguf", "not a Hugging Face folder"),
        ("someone/not-a-real-model-kvq", "cannot load model"),
    ],
)
def test_bad_models(spec, message):
    with pytest.raises(KvqError, match=message):
        load_config(resolve_model(spec))


def test_folder_without_config(tmp_path):
    with pytest.raises(KvqError, match="no config.json"):
        resolve_model(str(tmp_path))


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="shared corpora not present")
def test_local_corpora():
    text = load_text("wikitext2", str(SHARED_DATA))
    assert text.startswith(" = Robert Boulter = \n Robert Boulter is")
    assert len(load_text("wikitext2-valid", str(SHARED_DATA))) > 1_000_000


def test_dataset_not_found_offline_names_data_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("KVQ_DATA_DIR", raising=False)
    with pytest.raises(KvqError, match="--data-dir"):
        load_text("wikitext2", None)
    with pytest.raises(KvqError, match="--data-dir"):
        load_text("wikitext2", str(tmp_path))


def test_text_files(tmp_path):
    with pytest.raises(KvqError, match="neither a known name"):
        load_text(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(KvqError, match="empty"):
        load_text(str(empty))


def test_tokenize_is_cached(tiny_tokenizer, tiny_text):
    a = tokenize(tiny_text, tiny_tokenizer)
    b = tokenize(tiny_text, tiny_tokenizer)  # from the cache file
    assert a.dtype == torch.int64 and torch.equal(a, b)
    assert torch.equal(a, torch.tensor(tiny_tokenizer(tiny_text)["input_ids"]))


def test_windows():
    ids = torch.arange(10)
    assert windows(ids, 3).tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert windows(ids, 3, max_windows=2).shape == (2, 3)
    with pytest.raises(KvqError, match="too short"):
        windows(ids, 11)


@pytest.mark.parametrize("name", ["pg19", "c4"])
def test_hub_only_corpora_refused_offline(name, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KvqError, match="offline"):
        load_text(name, None)


def test_local_only_corpus_needs_data_dir(monkeypatch):
    monkeypatch.delenv("KVQ_DATA_DIR", raising=False)
    with pytest.raises(KvqError, match="--data-dir"):
        load_text("shakespeare", None)


def test_a_tokenizer_that_splits_into_characters_is_refused():
    """transformers 5.17 turns Gemma 3's GGUF tokenizer into one token per character: refused before any write."""
    from kvq_cli.models import check_tokenizer

    class Split:
        def __init__(self, per_char: bool):
            self.per_char = per_char

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": list(range(len(text) if self.per_char else len(text.split())))}

    check_tokenizer(Split(per_char=False), "m.gguf")
    with pytest.raises(KvqError, match=r"converts the tokenizer of m.gguf wrongly \(44 tokens .* upgrade"):
        check_tokenizer(Split(per_char=True), "m.gguf")
