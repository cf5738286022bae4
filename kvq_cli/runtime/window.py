"""``WindowLayer``: the cache of a sliding-window attention layer (Gemma 2/3, Mistral with a window, Phi-3).

Such a layer only ever attends to its last ``window`` tokens (query ``p`` sees keys ``(p - window, p]``), so its
cache is a ring of those tokens' post-RoPE keys and values in fp16, **not quantized**: at long contexts the
global layers (``KVQLayer``, packed) hold almost all the memory, and a window layer's share stays fixed at
``window`` tokens (``accounting.cache_bits`` counts it so, as ``kvq estimate-memory`` does). Attention is the
PyTorch reference (``attention.dense_attention`` with the window mask and the model's logit softcapping), one
query tile at a time; no Triton kernel serves these layers (``kernel_path.reference_reason`` says so).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers.cache_utils import CacheLayerMixin

from ..errors import KvqError
from .attention import QUERY_TILE, dense_attention


class BoundLayer:
    """What every kvq cache layer (``cache.KVQLayer``, ``WindowLayer``) answers transformers alike: the checks of an
    update (bound to the model, the batch it was loaded for), lengths, and refusals of beam search and cropping.
    Owns nothing: the layer has ``attn``, ``batch``, ``length``, ``max_tokens``, ``is_initialized``."""

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def check_update(self, key_states: Tensor, value_states: Tensor) -> None:
        """Refuse an update of a cache no longer bound, or of another batch size; initialize on the first."""
        if self.attn is None or getattr(self.attn, "_kvq_layer", None) is not self:
            raise KvqError("this KVQCache is not bound to the model: call cache.bind(model) (or load_cache again)")
        if key_states.shape[0] != self.batch:
            raise KvqError(f"the cache was loaded for batch_size {self.batch}, not {key_states.shape[0]} (beam search "
                           "and num_return_sequences are not supported)")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)

    def get_seq_length(self, *args) -> int:
        return self.length

    def get_mask_sizes(self, query_length, *args) -> tuple[int, int]:
        q = query_length if isinstance(query_length, int) else int(query_length.shape[0])
        return self.length + q, 0

    def get_max_length(self) -> int:
        return -1 if self.max_tokens is None else self.max_tokens

    get_max_cache_shape = get_max_length

    def _refuse(self, *args, **kwargs) -> None:
        raise KvqError("the kvq cache supports greedy/sampled generation only (no beam search, cropping or "
                       "batch reordering)")

    reorder_cache = crop = batch_repeat_interleave = batch_select_indices = _refuse

    def offload(self) -> None:  # the cache stays where it is
        pass

    def prefetch(self) -> None:
        pass


class WindowLayer(BoundLayer, CacheLayerMixin):
    """A sliding-window layer's fp16 ring of its last ``window`` tokens; ``update`` takes ``(B, H, T, D)``."""

    is_compileable = False
    is_sliding = True
    is_croppable = False

    def __init__(self, index: int, batch: int, window: int, max_tokens: int | None):
        super().__init__()
        self.index, self.batch, self.window, self.max_tokens = index, batch, window, max_tokens
        self.softcap: float | None = None
        self.full_chunk = True  # a prefill chunk attends to itself in full precision (else as stored: fp16)
        self.use_kernel: bool | None = None
        self.attn: nn.Module | None = None
        self.captured = None  # never a CUDA-graph step
        self.kernel_steps = self.reference_steps = 0
        self.query_tile = QUERY_TILE
        self.reset()

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Append ``(B, H, T, D)`` post-RoPE keys and values, keeping the last ``window``; returns them unchanged."""
        self.check_update(key_states, value_states)
        t = key_states.shape[2]
        if self.max_tokens is not None and self.length + t > self.max_tokens:
            raise KvqError(f"the cache is full ({self.max_tokens} tokens): load it with a larger max_tokens")
        self.before = (self.keys, self.values)  # the ring the chunk attends to (``attend``)
        self.keys, self.values = (x[:, :, -self.window:].to(torch.float16) if ring is None else
                                  torch.cat([ring, x.to(torch.float16)], 2)[:, :, -self.window:]
                                  for ring, x in ((self.keys, key_states), (self.values, value_states)))
        self.length += t
        self.pending = t
        return key_states, value_states

    def attend(self, query: Tensor, scaling: float, chunk: tuple[Tensor, Tensor]) -> Tensor:
        """Windowed attention of ``query (B, Hq, Tq, D)`` (the newest ``Tq`` positions) over the ring before the chunk
        and the chunk ``(B, Hkv, Tq, D)`` itself (full precision for a prefill chunk with ``full_chunk``, else as
        stored in fp16). Returns float32 ``(B, Hq, Tq, D)``."""
        tq = query.shape[2]
        self.reference_steps += tq == 1
        ck, cv = chunk
        if not (self.full_chunk and tq > 1):
            ck, cv = ck.to(torch.float16), cv.to(torch.float16)
        hk, hv = self.before
        self.before = (None, None)
        keys = ck.float() if hk is None else torch.cat([hk.float(), ck.float()], 2)  # (B, Hkv, n + Tq, D)
        values = cv.float() if hv is None else torch.cat([hv.float(), cv.float()], 2)
        first = keys.shape[2] - tq  # index of the first query's own key
        outs = []
        for s in range(0, tq, self.query_tile):
            e = min(s + self.query_tile, tq)
            a = max(0, first + s - self.window + 1)  # the oldest key the tile's first query sees
            outs.append(dense_attention(query[:, :, s:e], keys[:, :, a : first + e], values[:, :, a : first + e],
                                        scaling, self.softcap, self.window))
        return outs[0] if len(outs) == 1 else torch.cat(outs, 2)

    def reset(self) -> None:
        self.keys = self.values = None  # (B, H, <= window, D) fp16
        self.before: tuple[Tensor | None, Tensor | None] = (None, None)
        self.length = self.pending = 0
        self.is_initialized = False

    # the decode engine's questions: never a graph step
    def graph_capable(self) -> bool:
        return False

    def graph_kind(self) -> None:
        return None

    def nbytes(self, allocated: bool = False) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values) if t is not None)
