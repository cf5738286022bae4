"""Attention of new queries over a packed layer cache, one block of keys at a time (online softmax).

The cache's ``update()`` has already appended the current chunk, so the keys are positions ``[0, total)``
(sink, packed history, residual, the chunk itself) and query ``i`` of ``Tq`` sits at position
``total - Tq + i``. Blocks of at most ``block`` tokens are dequantized one at a time and merged with a
running log-sum-exp; no layer's whole K/V ever exists in 16 or 32 bits, except the bounded float copy that
layers on the CPU keep of their history (``decoded.DecodedMirror``: blocks then come as views of it).
GQA/MQA: query head ``i`` reads KV head ``i // G`` (``G = Hq / Hkv``), as ``repeat_kv``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import KvqError
from .prefill import merge

#: Tokens dequantized at once by the reference path.
DEFAULT_BLOCK = 2048
#: Queries attended at once (a long prefill goes tile by tile: scores are at most QUERY_TILE x block).
QUERY_TILE = 1024

Reader = Callable[[int, int], tuple[Tensor, Tensor]]
"""``read(a, b)`` -> keys (post-RoPE) and values of positions ``[a, b)``, float32 ``(B, Hkv, b - a, D)``."""


#: Position ranges whose RoPE angles a ``Rope`` keeps (least recently used out): every layer of a decode step rotates
#: the same blocks, so with at most this many blocks per step the angles are computed once per step, not per layer.
#: Each range of ``L`` positions costs ``4 L D`` bytes (cos and sin, float32, half width): as much as one KV head's
#: float32 keys of that block (at most 4 x 16 MiB for SmolLM2's 65536-token decode blocks).
ROPE_MEMO = 4


class RotaryView:
    """One layer type's frequencies inside a rotary embedding that holds several (Gemma 3: ``{type}_inv_freq`` and
    ``{type}_attention_scaling``), seen as a module with ``inv_freq`` and ``attention_scaling``."""

    def __init__(self, module: nn.Module, prefix: str):
        self.owner, self.prefix = module, prefix

    @property
    def inv_freq(self) -> Tensor:
        return getattr(self.owner, f"{self.prefix}inv_freq")

    @property
    def attention_scaling(self) -> float:
        return getattr(self.owner, f"{self.prefix}attention_scaling", 1.0)


class Rope:
    """The model's own rotary embedding (``inv_freq`` and ``attention_scaling`` of its ``rotary_emb``, or of one layer
    type inside it).

    Reads the module's current ``inv_freq`` at every call, so scaled and dynamic variants stay exact; the angles
    of the last ``ROPE_MEMO`` position ranges are reused while ``inv_freq`` and the scaling are unchanged. Partial
    rotary (``inv_freq`` shorter than ``D / 2``, Phi-4-mini): the first ``2 len(inv_freq)`` channels rotate, the
    rest pass through, as transformers' ``apply_rotary_pos_emb``.
    """

    def __init__(self, module):
        self.module = module
        self._memo: dict[int, tuple[int, Tensor, Tensor]] = {}  # first position -> (end, cos, sin (L, D/2))
        self._made_with: tuple[Tensor, float] | None = None  # (inv_freq, scaling) of the memo

    @classmethod
    def of(cls, model: nn.Module) -> Rope:
        """The model's one rotary embedding (``layers`` for models with one per layer type)."""
        for name, m in model.named_modules():
            if name.endswith("rotary_emb") and isinstance(getattr(m, "inv_freq", None), Tensor):
                return cls(m)
        raise KvqError(f"{type(model).__name__}: no rotary embedding (rotary_emb.inv_freq) found; pre-RoPE keys "
                       "need one")

    @classmethod
    def layers(cls, model: nn.Module, layer_types: list[str | None]) -> list[Rope]:
        """One ``Rope`` per layer (``layer_types[i]``: the layer type whose frequencies layer ``i`` uses, None: the
        model's one ``inv_freq``); layers of one type share theirs (and its memo)."""
        ropes: dict[str | None, Rope] = {}
        for kind in dict.fromkeys(layer_types):
            ropes[kind] = cls.of(model) if kind is None else cls(cls._typed(model, kind))
        return [ropes[k] for k in layer_types]

    @staticmethod
    def _typed(model: nn.Module, kind: str):
        modules = dict(model.named_modules())
        for name, m in modules.items():
            if name.endswith("rotary_emb") and isinstance(getattr(m, f"{kind}_inv_freq", None), Tensor):
                return RotaryView(m, f"{kind}_")
        local = next((m for n, m in modules.items() if n.endswith("rotary_emb_local")), None)  # older Gemma 3
        if kind == "sliding_attention" and isinstance(getattr(local, "inv_freq", None), Tensor):
            return local
        glob = next((m for n, m in modules.items() if n.endswith("rotary_emb")), None)
        if isinstance(getattr(glob, "inv_freq", None), Tensor):
            return glob
        raise KvqError(f"{type(model).__name__}: no rotary embedding for {kind} layers ({kind}_inv_freq) found")

    @property
    def inv_freq(self) -> Tensor:
        return self.module.inv_freq

    @property
    def attention_scaling(self) -> float:
        return float(getattr(self.module, "attention_scaling", 1.0))

    def _angles(self, positions: Tensor, inv_freq: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
        """``cos``, ``sin`` ``(L, D/2)`` of ``positions (L,)`` (HF's ``emb`` is ``cat([freqs, freqs])``: each half)."""
        freqs = positions.to(torch.float32)[:, None] * inv_freq[None, :]  # (L, D/2)
        cos, sin = freqs.cos(), freqs.sin()
        return (cos, sin) if scaling == 1.0 else (cos * scaling, sin * scaling)

    def angles(self, a: int, b: int, device) -> tuple[Tensor, Tensor]:
        """``cos``, ``sin`` ``(b - a, D/2)`` of positions ``[a, b)``, from the memo where it has them."""
        inv_freq = self.inv_freq.to(device, torch.float32)  # (R/2,): R = D but for partial rotary
        scaling = self.attention_scaling
        made = self._made_with
        if made is None or made[1] != scaling or made[0].device != inv_freq.device or not torch.equal(made[0],
                                                                                                        inv_freq):
            self._memo.clear()
            self._made_with = (inv_freq.clone(), scaling)
        end, cos, sin = self._memo.pop(a, (a, None, None))
        if end < b:  # compute the positions the memo lacks (each position's angle does not depend on the others)
            more = self._angles(torch.arange(end, b, device=device), inv_freq, scaling)
            cos, sin = more if cos is None else (torch.cat([cos, more[0]]), torch.cat([sin, more[1]]))
            end = b
        self._memo[a] = (end, cos, sin)  # now the most recent
        while len(self._memo) > ROPE_MEMO:
            del self._memo[next(iter(self._memo))]
        return cos[: b - a], sin[: b - a]

    def apply(self, k: Tensor, positions: Tensor) -> Tensor:
        """HF ``apply_rotary_pos_emb`` of float32 keys ``(B, H, L, D)`` at ``positions (L,)``, bit for bit.

        Consecutive positions on the CPU (``torch.arange(a, b)``) use the memo (``apply_range``)."""
        n = positions.numel()
        if positions.device.type == "cpu" and n:
            a = int(positions[0])
            if int(positions[-1]) == a + n - 1 and (n < 3 or torch.equal(positions, torch.arange(a, a + n))):
                return self.apply_range(k, a)
        inv_freq = self.inv_freq.to(k.device, torch.float32)
        return rotate_half_rope(k, *self._angles(positions, inv_freq, self.attention_scaling))

    def apply_range(self, k: Tensor, a: int) -> Tensor:
        """``apply`` at positions ``[a, a + L)`` of keys ``(B, H, L, D)``."""
        return rotate_half_rope(k, *self.angles(a, a + k.shape[2], k.device))


def rotate_half_rope(k: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``k * cat([cos, cos]) + rotate_half(k) * cat([sin, sin])`` for ``k (B, H, L, D)``, ``cos``/``sin`` ``(L, R/2)``,
    half by half: ``k1 cos - k2 sin`` and ``k2 cos + k1 sin`` (the same roundings: ``x + (-y) == x - y``). ``R < D``
    (partial rotary): channels ``[R, D)`` pass through unchanged."""
    half = cos.shape[-1]
    k1, k2 = k[..., :half], k[..., half : 2 * half]
    out = torch.empty_like(k)
    o1, o2 = out[..., :half], out[..., half : 2 * half]
    torch.mul(k1, cos, out=o1)
    o1.sub_(k2 * sin)
    torch.mul(k2, cos, out=o2)
    o2.add_(k1 * sin)
    if 2 * half < k.shape[-1]:
        out[..., 2 * half :] = k[..., 2 * half :]
    return out


def block_bounds(total: int, first: int, block: int) -> list[tuple[int, int]]:
    """Blocks of ``block`` tokens from ``first`` (the sink's size) up to ``total``, the first block also holding the
    sink ``[0, first)``: block edges stay ``block``-aligned after the sink (KIVI's key groups never straddle
    them) and the sink costs no block of its own (one block per decode step at moderate contexts)."""
    edges = list(range(first + block, total, block))
    return [(a, e) for a, e in zip([0, *edges], [*edges, total], strict=True) if e > a]


def fused_cpu(query: Tensor) -> bool:
    """PyTorch's CPU flash kernel (what SDPA runs for the 16-bit baseline) takes this query: float32 or bf16 on the
    CPU. It returns the log-sum-exp that merging blocks needs, and reads GQA K/V heads as ``repeat_kv``."""
    return query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16) and hasattr(
        torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def blockwise_attention(query: Tensor, read: Reader, total: int, scaling: float, bounds: list[tuple[int, int]],
                        softcap: float | None = None) -> Tensor:
    """Causal attention of ``query (B, Hq, Tq, D)`` over keys ``[0, total)`` read block by block.

    Several queries on the CPU (``fused_cpu``, no ``softcap``): each block through the fused kernel, merged by
    log-sum-exp (``prefill.merge``); otherwise an online softmax in plain PyTorch. ``softcap``: scores capped as
    ``cap tanh(s / cap)`` (Gemma 2). Returns float32 ``(B, Hq, Tq, D)``.
    """
    b, hq, tq, d = query.shape
    q0 = total - tq  # position of the first query
    fused = tq > 1 and fused_cpu(query) and softcap is None
    q = m = l = acc = None
    for a, e in bounds:
        k, v = read(a, e)  # (B, Hkv, L, D) each
        causal = None
        if e - 1 > q0:  # the block reaches past the first query: causal mask (Tq, L)
            causal = torch.arange(a, e, device=query.device)[None, :] > torch.arange(q0, total,
                                                                                      device=query.device)[:, None]
        if fused:
            acc = merge(acc, _fused_block(query, k, v, scaling, causal, max(0, min(a - q0, tq))))
            continue
        if q is None:
            hkv = k.shape[1]
            q = query.float().reshape(b, hkv, hq // hkv, tq, d) * scaling  # (B, Hkv, G, Tq, D)
        s = torch.einsum("bhgtd,bhld->bhgtl", q, k)  # (B, Hkv, G, Tq, L)
        if softcap is not None:
            s = torch.tanh(s / softcap) * softcap
        if causal is not None:
            s = s.masked_fill(causal, -math.inf)
        top = s.amax(-1, keepdim=True)  # (B, Hkv, G, Tq, 1)
        m_new = top if m is None else torch.maximum(m, top)
        safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)  # rows with nothing visible yet
        p = torch.exp(s - safe)  # (B, Hkv, G, Tq, L)
        pv = torch.einsum("bhgtl,bhld->bhgtd", p, v)
        if m is None:  # the first block: the running sums start here (no rescaling of zeros)
            l, acc = p.sum(-1, keepdim=True), pv
        else:
            alpha = torch.exp(m - safe)
            l = l * alpha + p.sum(-1, keepdim=True)
            acc = acc * alpha + pv
        m = m_new
    return acc[0] if fused else (acc / l).reshape(b, hq, tq, d)


def _fused_block(query: Tensor, k: Tensor, v: Tensor, scaling: float, causal: Tensor | None, blind: int
                 ) -> tuple[Tensor, Tensor]:
    """One block through the CPU flash kernel: ``out (B, Hq, Tq, D)`` and ``lse (B, Hq, Tq)``. ``causal (Tq, L)``
    marks hidden keys; the first ``blind`` queries see none of the block (their ``lse`` becomes -inf)."""
    mask = None if causal is None else torch.zeros(causal.shape, device=k.device).masked_fill_(causal, -math.inf)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query.float(), k, v, 0.0, False,
                                                                          attn_mask=mask, scale=scaling)
    if blind:
        lse[..., :blind] = -math.inf  # the kernel reports 0 for a row with nothing visible (its output is 0)
    return out, lse


def dense_attention(query: Tensor, k: Tensor, v: Tensor, scaling: float, softcap: float | None = None,
                    window: int | None = None) -> Tensor:
    """Reference: causal softmax attention of ``query (B, Hq, Tq, D)`` over full ``k, v (B, Hkv, T, D)`` (the queries
    are the last ``Tq`` positions); ``softcap``: scores capped as ``cap tanh(s / cap)``; ``window``: query ``p`` sees
    keys ``(p - window, p]`` only (transformers' sliding window). Returns float32 ``(B, Hq, Tq, D)``."""
    b, hq, tq, d = query.shape
    hkv, t = k.shape[1], k.shape[2]
    q = query.float().reshape(b, hkv, hq // hkv, tq, d)  # (B, Hkv, G, Tq, D)
    s = torch.einsum("bhgtd,bhld->bhgtl", q, k.float()) * scaling
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    keys, queries = torch.arange(t, device=q.device)[None, :], torch.arange(t - tq, t, device=q.device)[:, None]
    hidden = keys > queries  # (Tq, T)
    if window is not None:
        hidden |= keys <= queries - window
    p = torch.softmax(s.masked_fill(hidden, -math.inf), -1)
    return torch.einsum("bhgtl,bhld->bhgtd", p, v.float()).reshape(b, hq, tq, d)


def check_causal(mask: Tensor | None, total: int, tq: int) -> None:
    """Refuse masks other than plain causal over ``[0, total)`` (padding; sliding windows are the window layers')."""
    if mask is None:
        return
    allowed = mask if mask.dtype == torch.bool else mask == 0  # (B, 1, Tq, Tkv)
    allowed = allowed[..., -tq:, :total]
    causal = torch.arange(allowed.shape[-1], device=mask.device)[None, :] <= torch.arange(
        total - tq, total, device=mask.device)[:, None]  # (Tq, Tkv)
    if allowed.shape[-1] != total or not torch.equal(allowed, causal.expand_as(allowed)):
        raise KvqError("the kvq cache runs causal attention only: padded batches (attention_mask with padding) are "
                       "not supported")


def packed_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask, **kwargs):
    """Set as ``module._kvq_attention`` on bound layers: attention over the layer's packed cache.

    ``query (B, Hq, Tq, D)``; ``key``/``value`` are the chunk ``update()`` just stored, post-RoPE and in full
    precision: a prefill chunk attends to them as they are (``KVQLayer.attend``), the history as stored.
    Returns ``(B, Tq, Hq, D)`` in the query's dtype and
    ``None`` weights, as transformers' attention functions. Forwards run with another cache (or none)
    fall back to SDPA.
    """
    layer = getattr(module, "_kvq_layer", None)
    if layer is None or layer.pending != query.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        from ..hf_attention import softcap_attention

        plain = softcap_attention if kwargs.get("softcap") is not None else sdpa_attention_forward
        return plain(module, query, key, value, attention_mask, **kwargs)
    layer.pending = 0
    total = layer.get_seq_length()
    if layer.index == 0:
        check_causal(attention_mask, total, query.shape[2])
    scaling = kwargs.get("scaling") or getattr(module, "scaling", None) or 1.0 / math.sqrt(query.shape[-1])
    out = layer.attend(query, float(scaling), (key, value))  # (B, Hq, Tq, D)
    return out.transpose(1, 2).contiguous().to(query.dtype), None
