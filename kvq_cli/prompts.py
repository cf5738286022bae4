"""Prompts of an exact token count for ``kvq generate``: a text file repeated or cut, a passkey haystack, or
random token ids (models without a tokenizer).

The passkey haystack (Mohtashami & Jaggi, 2023): an instruction, filler text (War and Peace) with one
sentence stating a random 5-digit pass key at ``depth`` (0 = right after the instruction, 1 = right before
the question), and the question at the end, ending "The pass key is" so the answer is the continuation.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import KvqError

INSTRUCTION = ("There is an important piece of information hidden inside a lot of irrelevant text. Find it and "
               "memorize it. I will quiz you about it.\n\n")
NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\n\nWhat is the pass key? The pass key is"


@dataclass
class Prompt:
    """Token ids ``(1, N)`` and, for a haystack, the pass key and where it sits."""

    ids: Tensor
    passkey: str | None = None
    depth: float | None = None
    needle_token: int | None = None  # index of the needle's first token


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def fit_tokens(ids: list[int], context: int) -> list[int]:
    """``ids`` repeated (cycled) or cut to exactly ``context`` tokens."""
    if not ids:
        raise KvqError("the prompt is empty")
    reps = -(-context // len(ids))
    return (ids * reps)[:context]


def file_prompt(tokenizer, text: str, context: int | None) -> Prompt:
    """The text's tokens, repeated or cut to ``context`` tokens when given."""
    ids = _encode(tokenizer, text)
    if context is not None:
        ids = fit_tokens(ids, context)
    if not ids:
        raise KvqError("the prompt file has no text")
    return Prompt(torch.tensor([ids]))


def haystack_prompt(tokenizer, filler: str, context: int, depth: float, seed: int) -> Prompt:
    """A passkey-retrieval prompt of exactly ``context`` tokens (module docstring); ``seed`` picks the key and
    where in the filler text the haystack starts."""
    if not 0.0 <= depth <= 1.0:
        raise KvqError(f"--depth must be between 0 and 1, not {depth}")
    rng = random.Random(seed)
    key = str(rng.randint(10000, 99999))
    head, needle, tail = (_encode(tokenizer, t) for t in (INSTRUCTION, NEEDLE.format(key=key), QUESTION))
    fill = context - len(head) - len(needle) - len(tail)
    if fill < 0:
        raise KvqError(f"--context {context} is too short for a passkey haystack (at least "
                       f"{len(head) + len(needle) + len(tail)} tokens)")
    words = _encode(tokenizer, filler)
    start = rng.randrange(len(words)) if words else 0
    hay = fit_tokens(words[start:] + words[:start], fill) if fill else []
    before = round(depth * fill)
    ids = head + hay[:before] + needle + hay[before:] + tail
    return Prompt(torch.tensor([ids]), key, depth, len(head) + before)


def random_prompt(vocab: int, context: int, seed: int) -> Prompt:
    """``context`` random token ids (for random-weight models, which have no tokenizer)."""
    gen = torch.Generator().manual_seed(seed)
    return Prompt(torch.randint(0, vocab, (1, context), generator=gen))


def passkey_answer(text: str) -> str | None:
    """The first run of digits in a generated continuation (the model's answer), or None."""
    m = re.search(r"\d+", text)
    return m.group(0) if m else None
