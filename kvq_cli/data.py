"""The one text-source resolver: ``--dataset`` names or local files, tokenized ids cached by content hash.

Built-in names (local copies are looked for first, under ``--data-dir`` / ``KVQ_DATA_DIR``):

=================  =====================================================  ==============================
name               what                                                   local file under the data dir
=================  =====================================================  ==============================
wikitext2          WikiText-2 raw, test split (perplexity)                wikitext-2-raw/wiki.test.raw
wikitext2-valid    WikiText-2, validation split (calibration)             wikitext-2/valid.txt
shakespeare        Tiny Shakespeare (a second domain)                     tiny-shakespeare.txt
war-and-peace      War and Peace (long context, haystacks)                gutenberg/war-and-peace.txt
pg19               PG-19 test books (through ``datasets`` only)           -
c4                 C4 English validation (through ``datasets`` only)      -
=================  =====================================================  ==============================

Anything else is read as a path to a UTF-8 text file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import KvqError
from .models import cache_dir

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Corpus:
    local: str | None  # path under the data dir
    hub: tuple[str, str | None, str] | None  # (dataset, config, split) for ``datasets.load_dataset``
    hub_chars: int | None = None  # how much text to take from a streamed hub dataset


CORPORA: dict[str, Corpus] = {
    "wikitext2": Corpus("wikitext-2-raw/wiki.test.raw", ("wikitext", "wikitext-2-raw-v1", "test")),
    "wikitext2-valid": Corpus("wikitext-2/valid.txt", ("wikitext", "wikitext-2-v1", "validation")),
    "shakespeare": Corpus("tiny-shakespeare.txt", None),
    "war-and-peace": Corpus("gutenberg/war-and-peace.txt", None),
    "pg19": Corpus(None, ("emozilla/pg19", None, "test"), hub_chars=8_000_000),
    "c4": Corpus(None, ("allenai/c4", "en", "validation"), hub_chars=4_000_000),
}


def data_dir(explicit: str | None = None) -> Path | None:
    """``--data-dir`` if given, else ``KVQ_DATA_DIR``, else None."""
    value = explicit or os.environ.get("KVQ_DATA_DIR")
    return Path(value).expanduser() if value else None


def locate(dataset: str, data_dir_arg: str | None = None) -> Path | Corpus:
    """Where ``load_text`` reads ``dataset``: a local file, or the hub corpus (checked reachable, unless offline).
    Every missing corpus is one ``KvqError`` here, in well under 2 s, before torch or a model loads."""
    if dataset not in CORPORA:
        path = Path(dataset).expanduser()
        if not path.is_file():
            raise KvqError(f"dataset {dataset!r} is neither a known name ({', '.join(CORPORA)}) nor a text file")
        return path
    corpus = CORPORA[dataset]
    root = data_dir(data_dir_arg)
    if corpus.local and root is not None:
        local = root / corpus.local
        if local.is_file():
            return local
        if data_dir_arg:
            raise KvqError(f"dataset {dataset!r}: {local} not found under --data-dir {root}")
    if corpus.hub is None:
        raise KvqError(f"dataset {dataset!r} is only available locally: pass --data-dir (a folder with {corpus.local})")
    hint = f" (pass --data-dir, a folder with {corpus.local})" if corpus.local else ""
    if _offline():
        raise KvqError(f"dataset {dataset!r} not found offline (HF_HUB_OFFLINE is set){hint}")
    if not hub_reachable():
        raise KvqError(f"dataset {dataset!r} is not found locally and the hub cannot be reached{hint}; "
                       "HF_HUB_OFFLINE=1 never tries")
    return corpus


def load_text(dataset: str, data_dir_arg: str | None = None) -> str:
    """The text of a dataset name or a local file path."""
    where = locate(dataset, data_dir_arg)
    return read_text_file(where) if isinstance(where, Path) else _from_hub(dataset, where)


#: Largest text file read whole (the corpora are far smaller).
MAX_TEXT_BYTES = 1 << 30


def read_text_file(path: Path, max_bytes: int = MAX_TEXT_BYTES, cut: bool = False) -> str:
    """A UTF-8 text file, checked before it is read: a regular file (never a FIFO or device) of at most
    ``max_bytes`` bytes, or with ``cut`` its first ``max_bytes`` bytes. Every problem is one `KvqError` line."""
    from .artifact import check_readable

    path = Path(path)
    check_readable(path, "text file")
    try:
        size = path.stat().st_size
        if size > max_bytes and not cut:
            raise KvqError(f"text file {path} is {size:,} bytes; at most {max_bytes:,} are read")
        with open(path, "rb") as f:
            data = f.read(max_bytes)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            if not (size > max_bytes and exc.start >= len(data) - 3):  # a character split by the cut is dropped
                raise
            text = data[: exc.start].decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KvqError(f"cannot read text file {path}: {exc}") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as text mode reads them
    if not text.strip():
        raise KvqError(f"text file {path} is empty")
    return text


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")


def hub_reachable(timeout: float = 1.5) -> bool:
    """Whether the hub's host (``HF_ENDPOINT``, default huggingface.co) accepts a connection within ``timeout``
    seconds: asked before ``datasets`` would spend half a minute retrying an unreachable hub."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _from_hub(name: str, corpus: Corpus) -> str:
    repo, config, split = corpus.hub
    hint = f", or pass --data-dir (a folder with {corpus.local})" if corpus.local else ""
    try:
        import datasets
    except ImportError:
        raise KvqError(f"dataset {name!r} needs the 'datasets' package, or a local copy under --data-dir") from None
    try:
        if corpus.hub_chars is None:
            rows = datasets.load_dataset(repo, config, split=split)["text"]
            return "".join(rows)
        parts, size = [], 0
        for row in datasets.load_dataset(repo, config, split=split, streaming=True):
            parts.append(row["text"])
            size += len(row["text"])
            if size >= corpus.hub_chars:
                break
        return "\n\n".join(parts)
    except Exception as exc:  # noqa: BLE001 - network and hub errors come in many types
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise KvqError(f"dataset {name!r} could not be loaded from the hub ({first}){hint}") from None


def tokenize(text: str, tokenizer) -> torch.Tensor:
    """Token ids ``(N,)`` int64 of the whole text, cached on disk by content and tokenizer hash."""
    import torch

    key = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16] + "-" + _tokenizer_hash(tokenizer)
    path = cache_dir() / "tokens" / f"{key}.pt.npy"
    if path.is_file():
        import numpy as np

        try:
            return torch.from_numpy(np.load(path, allow_pickle=False).astype("int64"))
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt below
    ids = torch.tensor(tokenizer(text, return_attention_mask=False)["input_ids"], dtype=torch.int64)
    _save_ids(ids, path)
    return ids


def _tokenizer_hash(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(str(len(tokenizer)).encode())
    probe = "kvq tokenizer probe: The quick brown fox, 1234567890 éü 中文"
    h.update(str(tokenizer(probe)["input_ids"]).encode())
    return h.hexdigest()[:12]


def _save_ids(ids: torch.Tensor, path: Path) -> None:
    """Cache the ids; a cache that cannot be written (read-only ``KVQ_CACHE``, a full disk) is skipped: it only
    saves the next run's tokenization."""
    import numpy as np

    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, ids.numpy().astype("int32"), allow_pickle=False)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()


def windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``(W, seqlen)`` of the ids (the tail shorter than seqlen is dropped)."""
    count = ids.numel() // seqlen
    if count == 0:
        raise KvqError(f"text has {ids.numel()} tokens: too short for one window of --seqlen {seqlen}")
    if max_windows is not None:
        count = min(count, max_windows)
    return ids[: count * seqlen].view(count, seqlen)
