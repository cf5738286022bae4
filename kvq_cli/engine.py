"""The decode engine: a chunked prefill, then one decode step per token, captured once as a CUDA graph.

``Decoder(net, cache, sampler)`` is what ``kvq generate``, the benches and library users decode through:

* ``prefill(ids, chunk)`` runs the prompt ``chunk`` tokens at a time (eager: shapes vary) and returns the first
  new token; ``step(token)`` returns the next one.
* On CUDA (``graphs=None``: where possible) the step - embedding, every layer, the cache's append and decode
  attention, the head and the sampler - is captured once with ``torch.cuda.graph`` and replayed per token.
  Everything that changes from token to token lives in device tensors the graph reads (the token, its
  position, the cache's counts); nothing is re-captured as the context grows.
* The 16-bit baseline is transformers' ``StaticCache`` under the same capture (``static_cache``), so every
  ratio compares engine with engine. Eager steps hold SDPA to its FlashAttention / memory-efficient kernels
  (cuDNN attention re-plans at each eager call); captured steps keep torch's choice (``SDPA``).
* A ``KVQCache`` replays a graph on the steps where every layer can (``KVQCache.graph_kind``), with the counts
  in device tensors: kivi (any group the kernels take) has one graph for the steps whose token joins the fp16 residual
  window ("plain") and one for the steps where the full window's oldest group leaves into the packed store
  ("flush"); kvquant (sink, no residual window) one for its fused append of each token ("append"; the host
  reserves room for the token's sparse outliers before each replay, and a reallocation means a re-capture);
  int, nf, cq and pq one "flush" graph (each step's oldest window token, or the token itself without a window,
  encoded by the method into the packed store; cq's pre-RoPE keys need no window), pq also a "plain" one. Other
  steps run eagerly: the first ones (sink filling, nothing packed yet), and every step of a configuration the
  kernels do not hold (``KVQLayer.graph_capable``).
  ``stats`` counts both.

Sampling (``Sampler``) happens inside the step: greedy by default, else temperature, top-k and top-p with
the Gumbel-max trick (graph-safe random numbers from the seeded CUDA generator).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .errors import KvqError
from .hf_attention import cache_kwargs


@dataclass(frozen=True)
class Sampler:
    """Next-token choice from logits ``(B, V)``: greedy when ``temperature == 0``, else the softmax of
    ``logits / temperature`` restricted to the ``top_k`` most likely tokens (0: all) and to the smallest set
    whose probability reaches ``top_p`` (1.0: all)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise KvqError("--temperature and --top-k must be >= 0 and --top-p in (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: Tensor) -> Tensor:
        """``logits (B, V)`` -> token ids ``(B,)``; only device operations of fixed shapes (graph-safe)."""
        if self.greedy:
            return logits.argmax(-1)
        x = logits.float() / self.temperature  # (B, V)
        if self.top_k:
            kth = torch.topk(x, min(self.top_k, x.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
            x = x.masked_fill(x < kth, -float("inf"))
        if self.top_p < 1:
            srt, idx = torch.sort(x, dim=-1, descending=True)  # (B, V)
            p = torch.softmax(srt, -1)
            drop = p.cumsum(-1) - p >= self.top_p  # keep the most likely tokens up to the first reaching top_p
            x = x.scatter(-1, idx, srt.masked_fill(drop, -float("inf")))
        gumbel = -torch.log(-torch.log(torch.rand_like(x).clamp_(1e-20, 1.0)))
        return (x + gumbel).argmax(-1)


def static_cache(net: nn.Module, batch: int, max_tokens: int):
    """transformers' ``StaticCache`` for ``max_tokens`` positions (the 16-bit baseline of the engine)."""
    from transformers import StaticCache

    return StaticCache(config=net.config, max_cache_len=max_tokens, max_batch_size=batch)


#: SDPA backends of eager steps on CUDA: "flash-efficient" (cuDNN attention re-plans at every eager call, ~2 ms
#: of host time a layer on the H200) or "default" (torch's choice); ``KVQ_SDPA`` overrides it (a bench knob).
#: Captured steps keep torch's choice: a graph plans once, at capture, and cuDNN decodes the StaticCache's
#: masked attention 2.6x faster than the memory-efficient kernel (SmolLM2 shape, 4K, H200).
SDPA = os.environ.get("KVQ_SDPA", "flash-efficient")


def _sdpa_context(device: torch.device, captured: bool = False):
    """SDPA held to FlashAttention / memory-efficient kernels for eager steps on CUDA."""
    if device.type != "cuda" or SDPA == "default" or captured:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])


class Decoder:
    """Prefill and decode ``net`` through ``cache`` (a ``KVQCache``, a transformers ``StaticCache`` or
    ``DynamicCache``). ``graphs``: capture the decode step as a CUDA graph (None: on CUDA, where the cache
    allows it; never on the CPU)."""

    def __init__(self, net: nn.Module, cache, sampler: Sampler | None = None, graphs: bool | None = None):
        self.net, self.cache, self.sampler = net, cache, sampler or Sampler()
        self.device = net.get_input_embeddings().weight.device
        capturable = self.device.type == "cuda" and _capturable(cache)
        if graphs and not capturable:
            raise KvqError("CUDA graphs need a CUDA device, one GPU and a StaticCache or packed cache")
        self.graphs = capturable if graphs is None else bool(graphs)
        self.position = 0  # tokens in the cache
        self.stats = {"graph_steps": 0, "eager_steps": 0, "captures": 0}
        self._graphs: dict[str, torch.cuda.CUDAGraph] = {}  # one captured step per kind (``graph_kind``)
        self._out: dict[str, Tensor] = {}
        self._pool = None
        self._signature: tuple = ()
        self._token = self._pos = None

    def _forward(self, ids: Tensor, positions: Tensor | None = None, captured: bool = False) -> Tensor:
        """Logits of the last position ``(B, V)``."""
        with _sdpa_context(self.device, captured):
            out = self.net(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                           **cache_kwargs(self.net, self.cache))
        return out.logits[:, -1]

    @torch.inference_mode()
    def prefill(self, ids: Tensor, chunk: int, advance: Callable[[int], None] = lambda n: None) -> Tensor:
        """Feed ``ids (B, N)`` ``chunk`` tokens at a time; returns the first new token ``(B,)``."""
        logits = None
        for s in range(0, ids.shape[1], chunk):
            e = min(s + chunk, ids.shape[1])
            positions = torch.arange(self.position + s, self.position + e, device=ids.device)[None]
            logits = self._forward(ids[:, s:e], positions)
            advance(e - s)
        self.position += ids.shape[1]
        return self.sampler(logits)

    @torch.inference_mode()
    def fill(self, tokens: int, chunk: int, advance: Callable[[int], None] = lambda n: None, seed: int = 0) -> None:
        """Append ``tokens`` positions of random keys and values (standard normal, the model's dtype) to every
        layer through the cache's own append path, ``chunk`` at a time, without running the model: a context far
        longer than a prefill could make in the time (speed and memory only; nothing is attended). Pre-RoPE
        methods take the same random keys as pre-RoPE keys."""
        from .hf_attention import attention_layers, layer_device

        layers = _cache_layers(self.net)
        devices = [layer_device(attn) for attn in attention_layers(self.net)]  # (--device-map: one per layer)
        gens = {d: torch.Generator(d).manual_seed(seed) for d in set(devices)}
        weight = self.net.get_input_embeddings().weight
        for s in range(0, tokens, chunk):
            n = min(chunk, tokens - s)
            for i, ((heads, dim), dev) in enumerate(zip(layers, devices, strict=True)):
                k = torch.randn(1, heads, n, dim, device=dev, dtype=weight.dtype, generator=gens[dev])
                v = torch.randn(1, heads, n, dim, device=dev, dtype=weight.dtype, generator=gens[dev])
                layer = getattr(self.cache, "layers", [None] * len(layers))[i]
                if getattr(getattr(layer, "method", None), "keys_pre_rope", False):
                    layer.pre_rope_key = k
                self.cache.update(k, v, i, {"cache_position": torch.arange(self.position + s,
                                                                           self.position + s + n, device=dev)})
            advance(n)
        self.position += tokens

    @torch.inference_mode()
    def step(self, token: Tensor) -> Tensor:
        """Feed ``token (B,)`` at the next position; returns the next token ``(B,)``."""
        kind_of = getattr(self.cache, "graph_kind", None)
        kind = "plain" if kind_of is None else kind_of()  # a StaticCache has one kind of step
        out = self._replay(token, kind) if self.graphs and kind is not None else self._eager(token)
        self.position += 1
        return out

    def _eager(self, token: Tensor) -> Tensor:
        self.stats["eager_steps"] += 1
        pos = torch.full((token.shape[0], 1), self.position, device=token.device, dtype=torch.long)
        return self.sampler(self._forward(token[:, None], pos))

    def _replay(self, token: Tensor, kind: str) -> Tensor:
        """A step of ``kind`` as a graph replay; the first of each kind is a real warm-up step (on a side stream,
        as ``torch.cuda.graph`` asks), then the capture. The graphs share one memory pool. When the cache has
        moved a buffer the graphs use (``graph_signature``), they are captured again (``stats["captures"]``
        counts these re-captures)."""
        cache = self.cache
        enter = getattr(cache, "enter_graph_step", lambda kind: None)
        enter(kind)  # device counts for this step (a packed cache)
        if self._token is None:
            self._token = token[:, None].clone()  # (B, 1) static inputs every graph reads
            self._pos = torch.full_like(self._token, self.position)
        self._token.copy_(token[:, None])
        self._pos.fill_(self.position)
        signature = getattr(cache, "graph_signature", tuple)()
        if signature != self._signature:  # buffers a graph reads were reallocated (sparse outliers grew): recapture
            self._graphs, self._out, self._pool, self._signature = {}, {}, None, signature
            self.stats["captures"] += bool(self.stats["graph_steps"])
        graph = self._graphs.get(kind)
        if graph is None:
            stream = torch.cuda.Stream(self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                out = self.sampler(self._forward(self._token, self._pos, True))
            torch.cuda.current_stream(self.device).wait_stream(stream)
            self._done(kind)
            enter(kind)  # (the capture records; it does not run)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self._pool):
                    self._out[kind] = self.sampler(self._forward(self._token, self._pos, True))
            except RuntimeError as exc:  # a capture torch refuses: decode on eagerly, and say so
                self.graphs, self.stats["capture_error"] = False, f"{type(exc).__name__}: {exc}".splitlines()[0]
                return out.clone()
            finally:
                getattr(cache, "leave_graph_step", lambda: None)()
            self._pool = self._pool or graph.pool()
            self._graphs[kind] = graph
            return out.clone()
        graph.replay()
        self._done(kind)
        return self._out[kind].clone()

    def _done(self, kind: str) -> None:
        self.stats["graph_steps"] += 1
        getattr(self.cache, "graph_step_done", lambda kind: None)(kind)


def _cache_layers(net: nn.Module) -> list[tuple[int, int]]:
    """``(kv_heads, head_dim)`` of each attention layer of ``net`` (what ``fill`` writes)."""
    from .hf_attention import geometry_from_config

    geom = geometry_from_config(net.config)
    return [(geom.kv_heads, geom.head_dim)] * geom.layers


def _capturable(cache) -> bool:
    """A cache whose decode step can be captured: a ``StaticCache``, or a ``KVQCache`` on one device."""
    from transformers import StaticCache

    if isinstance(cache, StaticCache):
        return True
    capturable = getattr(cache, "capturable", None)
    return bool(capturable and capturable())
