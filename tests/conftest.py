"""Shared fixtures: tiny random-initialized models (Llama GQA, Mistral, Qwen2) and a tiny tokenizer.

No test needs the model hub: HF_HUB_OFFLINE is set before transformers is imported.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VOCAB = 320


def tiny_config(arch: str = "llama", **overrides):
    """A 2-layer config with RoPE; GQA (4 query / 2 KV heads, head_dim 16) unless overridden."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )
    common.update(overrides)
    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[arch]
    if arch == "mistral":
        common.setdefault("sliding_window", None)
    return cls(**common)


def check_word_path(module, switch: str, call, want, tol: float, exact: bool) -> None:
    """A kernel's word path against its byte-wise twin: ``call()`` with ``module.<switch>`` off, then on (restored on
    after). The word path lies within ``tol`` (relative) of ``want`` and of the byte-wise output; ``exact``: within
    1e-6 of it (float32 dots of exact codes make the same sums)."""
    def rel(a, b):
        return ((a - b).norm() / b.float().norm()).item()

    got = {}
    try:
        for on in (False, True):
            setattr(module, switch, on)
            got[on] = call().float()
    finally:
        setattr(module, switch, True)
    assert rel(got[True], want) < tol and rel(got[True], got[False]) < tol
    if exact:
        assert rel(got[True], got[False]) < 1e-6


def check_gluon_loop(module: str, calls: list[str], mmas: int, shared_loads: int = 0) -> None:
    """Compile Gluon programs for sm_90 in a child process (Gluon does not compile under ``TRITON_INTERPRET=1``,
    which the kernel tests set): ``module.<call>['loop']`` for each call must have ``mmas`` MMAs, global loads,
    ``shared_loads`` shared-memory loads (the program's own gathers) and no other shared-memory instruction, barrier
    or integer-to-float conversion."""
    import json
    import subprocess
    import sys

    pytest.importorskip("triton.experimental.gluon")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import json; import kvq_kernels.{module} as m; print(json.dumps([" +
            ", ".join(f"m.{c}['loop']" for c in calls) + "]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for loop in json.loads(out.stdout.strip().splitlines()[-1]):
        assert loop["mma.sync"] == mmas and loop["ld.global"] > 0, loop
        assert loop["ld.shared"] == shared_loads and loop["st.shared"] == loop["bar.sync"] == 0, loop
        assert loop["cvt.rn.f16.u"] == loop["cvt.rn.f32.u"] == 0, loop


def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32)
    with torch.no_grad():  # larger weights than the default init, so attention is far from uniform
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(8.0)
    return model.eval()


ARCHS = ["llama", "mistral", "qwen2"]


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_text() -> str:
    words = "the cache of keys and values grows with every token so we quantize it to a few bits".split()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(words), (6000,), generator=g)
    return " ".join(words[i] for i in idx.tolist()) + "\n"


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_text):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator([tiny_text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama (GQA) saved as a local Hugging Face folder with its tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_text_file(tmp_path_factory, tiny_text) -> Path:
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text(tiny_text)
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path_factory, monkeypatch):
    """Unit tests' token caches go to a temporary folder; integration tests reuse the user's model cache."""
    if request.node.get_closest_marker("integration"):
        return
    monkeypatch.setenv("KVQ_CACHE", str(tmp_path_factory.getbasetemp() / "kvq-cache"))
