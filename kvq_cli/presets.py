"""Offline shapes of common models and memory sizes of common GPUs, for ``kvq estimate-memory``.

A ``ModelShape`` is what a memory estimate needs from a model: the KV geometry (layers, KV heads,
head_dim) and the shapes that give the parameter count of a dense Llama-like decoder (gated MLP,
RMSNorm, optional q/k/v biases). Preset shapes are copied from each model's published ``config.json``;
parameter counts are computed from them (tests check them against the published counts).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import KvqError
from .hf_config import KVGeometry, geometry_from_config, text_config

GiB = 1 << 30


@dataclass(frozen=True)
class ModelShape:
    """Shapes of a dense decoder-only transformer with a gated MLP (Llama, Mistral, Qwen2, SmolLM2)."""

    name: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    max_positions: int | None
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    architecture: str = "LlamaForCausalLM"
    #: each layer's sliding window (None: global), as ``KVGeometry.windows``; None: every layer global
    windows: tuple[int | None, ...] | None = None
    rope_thetas: dict[str, float] | None = None  # one theta per layer type (Gemma 3), else ``rope_theta``

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer: attention (q, k, v, o, optional biases), gated MLP, 2 RMSNorms."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = self.hidden * (2 * q + 2 * kv) + (q + 2 * kv if self.qkv_bias else 0)
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def params(self) -> int:
        """Parameter count: embeddings (+ LM head unless tied), the decoder layers, the final RMSNorm."""
        head = 0 if self.tied_embeddings else self.vocab * self.hidden
        return self.vocab * self.hidden + head + self.layers * self.layer_params + self.hidden

    def geometry(self) -> KVGeometry:
        return KVGeometry(self.layers, self.kv_heads, self.head_dim, self.heads, self.rope_thetas or self.rope_theta,
                          self.max_positions, self.architecture, self.windows)


def _preset(name, layers, hidden, heads, kv_heads, intermediate, vocab, tied, positions, theta, **kw) -> ModelShape:
    return ModelShape(name, layers, hidden, heads, kv_heads, hidden // heads, intermediate, vocab, tied, positions,
                      float(theta), **kw)


#: name -> shapes (from the models' config.json files).
MODEL_PRESETS: dict[str, ModelShape] = {
    p.name: p
    for p in (
        _preset("llama-7b", 32, 4096, 32, 32, 11008, 32000, False, 2048, 10000),
        _preset("llama-2-7b", 32, 4096, 32, 32, 11008, 32000, False, 4096, 10000),
        _preset("llama-2-13b", 40, 5120, 40, 40, 13824, 32000, False, 4096, 10000),
        _preset("llama-2-70b", 80, 8192, 64, 8, 28672, 32000, False, 4096, 10000),
        _preset("llama-3-8b", 32, 4096, 32, 8, 14336, 128256, False, 8192, 500000),
        _preset("llama-3.1-8b", 32, 4096, 32, 8, 14336, 128256, False, 131072, 500000),
        _preset("llama-3.2-1b", 16, 2048, 32, 8, 8192, 128256, True, 131072, 500000),
        _preset("llama-3-70b", 80, 8192, 64, 8, 28672, 128256, False, 8192, 500000),
        _preset("llama-3.1-70b", 80, 8192, 64, 8, 28672, 128256, False, 131072, 500000),
        _preset("mistral-7b", 32, 4096, 32, 8, 14336, 32768, False, 32768, 1000000,
                architecture="MistralForCausalLM"),  # v0.3 (no sliding window)
        _preset("qwen2.5-7b", 28, 3584, 28, 4, 18944, 152064, False, 131072, 1000000, qkv_bias=True,
                architecture="Qwen2ForCausalLM"),
        _preset("smollm2-135m", 30, 576, 9, 3, 1536, 49152, True, 8192, 100000),
        ModelShape("gemma3-270m", 18, 640, 4, 1, 256, 2048, 262144, True, 32768, 1e6, architecture="Gemma3ForCausalLM",
                   windows=tuple(None if (i + 1) % 6 == 0 else 512 for i in range(18)),
                   rope_thetas={"sliding_attention": 10000.0, "full_attention": 1e6}),  # 5 sliding : 1 full
    )
}

#: GPU name -> memory in bytes: the card's nominal size in GiB, except the H200's, which is what CUDA reports on one
#: (``torch.cuda.get_device_properties(0).total_memory``, measured on the device tool's H200s; nvidia-smi says
#: 143,771 MiB). Its data sheet's "141 GB" read as 10**9 bytes gave 131.3 GiB, 8.5 GiB short of the real card.
GPU_PRESETS: dict[str, int] = {
    "h100-80gb": 80 * GiB,
    "a100-80gb": 80 * GiB,
    "a100-40gb": 40 * GiB,
    "h200": 150_109_880_320,  # 139.8 GiB
    "l40s": 48 * GiB,
    "a6000": 48 * GiB,
    "rtx4090": 24 * GiB,
    "rtx3090": 24 * GiB,
}


def shape_from_config(config, name: str) -> ModelShape:
    """A ``ModelShape`` from a Hugging Face config; one ``KvqError`` line naming what is missing."""
    cfg = text_config(config)
    need = ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size", "vocab_size")
    missing = [k for k in need if getattr(cfg, k, None) is None]
    if missing:
        raise KvqError(f"the configuration of {name} has no {', '.join(missing)}: memory cannot be estimated")
    heads = cfg.num_attention_heads
    where = f"the configuration of {name}"
    for key, limit in (("hidden_size", 1 << 20), ("num_attention_heads", 4096), ("intermediate_size", 1 << 22),
                       ("vocab_size", 1 << 24)):
        value = getattr(cfg, key)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
            raise KvqError(f"{where}: {key} must be an integer in 1..{limit}, not {value!r}")
    bias = getattr(cfg, "attention_bias", None)
    tied = getattr(config, "tie_word_embeddings", None)
    try:
        geom = geometry_from_config(cfg)
    except KvqError as exc:
        raise KvqError(str(exc).replace("the model's config", where)) from None
    kv_heads, head_dim, theta, arch = geom.kv_heads, geom.head_dim, geom.rope_theta, geom.architecture
    return ModelShape(
        name=name,
        layers=cfg.num_hidden_layers,
        hidden=cfg.hidden_size,
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim,
        intermediate=cfg.intermediate_size,
        vocab=cfg.vocab_size,
        tied_embeddings=bool(getattr(cfg, "tie_word_embeddings", False) if tied is None else tied),
        max_positions=getattr(cfg, "max_position_embeddings", None),
        rope_theta=float(theta["full_attention"] if "full_attention" in theta else next(iter(theta.values())))
        if isinstance(theta, dict) else float(theta),
        qkv_bias=bool(getattr(cfg, "model_type", "") == "qwen2" if bias is None else bias),
        architecture=arch,
        windows=geom.windows,
        rope_thetas=theta if isinstance(theta, dict) else None,
    )


#: Positions of a ``random:<preset>`` model (no trained context to stay within).
RANDOM_POSITIONS = 1 << 24


def random_shape(preset: str, name: str) -> ModelShape:
    """The shapes of the model ``random:<preset>`` runs (``config_for(..., RANDOM_POSITIONS)``: one RoPE theta, every
    layer global), without transformers."""
    return dataclasses.replace(MODEL_PRESETS[preset], name=name, max_positions=RANDOM_POSITIONS, windows=None,
                               rope_thetas=None)


def config_for(shape: ModelShape, max_positions: int | None = None):
    """A transformers config with ``shape``'s sizes (default RoPE with its theta, no rope scaling), for
    random-weight models of that shape (``--model random:<preset>``)."""
    from transformers import AutoConfig

    model_type = {"MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"}.get(shape.architecture, "llama")
    kwargs = dict(
        hidden_size=shape.hidden, intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=shape.head_dim,
        vocab_size=shape.vocab, tie_word_embeddings=shape.tied_embeddings, rope_theta=shape.rope_theta,
        max_position_embeddings=max_positions or shape.max_positions or 4096,
    )
    if model_type == "llama":
        kwargs["attention_bias"] = shape.qkv_bias
    if model_type == "mistral":
        kwargs["sliding_window"] = None
    config = AutoConfig.for_model(model_type, **kwargs)
    config.architectures = [shape.architecture]
    return config
