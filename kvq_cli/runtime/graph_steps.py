"""CUDA-graph decode steps of the packed cache (``engine.Decoder``): mixins of ``KVQLayer`` and ``KVQCache``.

A captured step has static shapes and reads everything that changes from token to token from device tensors:
``lens`` (int64 ``[n_packed, n_res, residual slot, packed offset]``, written before each replay by
``KVQCache.enter_graph_step``). The Triton kernels read the counts from it (their split plans cover the
capacity); the host's Python counts catch up after each replay (``graph_step_done``). Kinds of step:

* "plain" (kivi): the token joins the fp16 residual window at the device's slot;
* "flush" (kivi; int, nf, cq and pq, whose group is one token, with or without a window): the window is full; its
  oldest group leaves, encoded by the method, into the packed store at the device's offset (``Stream.graph_flush``)
  and the rest moves down (static sizes: the window is exactly full); pre-RoPE cq keys have no window, so the
  token's own pre-RoPE key is encoded;
* "append" (kvquant, no residual window): the fused append writes the token and its sparse outliers at the
  device's index; the host reserves the outliers' room before the step, and a reallocation changes
  ``graph_signature`` (the engine then captures again).
"""

from __future__ import annotations

import torch
from torch import Tensor


class GraphStepsLayer:
    """The graph-step side of ``KVQLayer`` (which owns ``method``, the streams, ``fused``, ``lens``, ``captured``)."""

    def graph_update(self, key_states: Tensor, value_states: Tensor) -> tuple[Tensor, Tensor]:
        """``update`` inside a captured step of kind ``self.captured``: returns the chunk unchanged."""
        if self.captured == "plain":  # the token joins the residual window at the device's slot
            slot = self.lens[2:3]
            self.keys_stream.residual.buf.index_copy_(2, slot, key_states.to(torch.float16))
            self.values_stream.residual.buf.index_copy_(2, slot, value_states.to(torch.float16))
        elif self.captured == "append":  # kvquant's token (pre-RoPE key) into the packed store at the device's index
            keys = self.pre_rope_key if self.method.keys_pre_rope else key_states
            self.pre_rope_key = None
            state, at = self.state(), self.lens[3:4]
            self.fused[0].at_device(self.keys_stream.packed, keys, state, at)
            self.fused[1].at_device(self.values_stream.packed, value_states, state, at)
        else:  # "flush": the full window's oldest group leaves at the device's offset
            keys = key_states
            if self.method.keys_pre_rope:  # cq's pre-RoPE keys (no window: the token itself leaves)
                keys, self.pre_rope_key = self.pre_rope_key, None
            state, offset = self.state(), self.lens[3:4]
            self.keys_stream.graph_flush(keys, state, self.method.encode_keys, offset)
            self.values_stream.graph_flush(value_states, state, self.method.encode_values, offset)
        self.pending = key_states.shape[2]
        return key_states, value_states

    def graph_capable(self) -> bool:
        """Whether this layer's decode steps can be captured (the Triton kernels read their counts from the
        device; fixed capacities from ``max_tokens``; kernels not switched off): kivi with a group the kernels take
        (a power of two >= 16) and a residual window; int and nf (any window: their tokens leave it one at a time,
        a "flush" of one token); cq and pq whose kernels hold the layer (``vq_refusal``; pre-RoPE cq keys with no
        residual window, as the method stores them: each token is encoded on arrival by a "flush");
        kvquant whose kernel and fused append hold the layer exactly, with no residual window."""
        m = self.method
        if self.use_kernel is False or self.max_tokens is None:
            return False
        if m.name == "kivi":
            from kvq_kernels.reference import kivi_group_supported

            return kivi_group_supported(m.group) and m.residual >= 1 and not m.keys_pre_rope
        if m.name in ("int", "nf"):  # one token leaves the window per step ("flush"; no window: at once)
            return True
        from .kernel_path import kvquant_refusal, vq_refusal

        if m.name in ("cq", "pq"):
            return vq_refusal(self) is None and not (m.keys_pre_rope and self.keys_stream.window)

        return (m.name == "kvquant" and None not in self.fused and not m.residual and bool(m.sink)
                and kvquant_refusal(self) is None)

    def graph_kind(self) -> str | None:
        """Which graph step the next token takes: "plain" (it only joins the residual window), "flush" (the full
        window's oldest group leaves too), or None (an eager step: sink not full, nothing packed yet, ...)."""
        ks, vs = self.keys_stream, self.values_stream
        if not (ks.sink is not None and ks.sink.n == ks.sink_size and ks.residual.n == vs.residual.n
                and ks.packed.n == vs.packed.n and "codes" in ks.packed.fields and "codes" in vs.packed.fields):
            return None
        if self.method.name == "kvquant":  # every token goes straight to the packed store
            return "append" if ks.window == 0 and ks.packed.n < ks.packed.capacity else None
        if ks.residual.n < ks.window:
            return "plain"
        return "flush" if ks.residual.n == ks.window and ks.window + 1 >= ks.step else None

    def fix_residual_capacity(self) -> None:
        """Residual buffers at their final size (the window), so no later append moves them under a graph."""
        for stream in (self.keys_stream, self.values_stream):
            stream.residual.ensure(stream.window)

    def graph_step_done(self, kind: str) -> None:
        """After a replayed step of ``kind``: the host's counts catch up with what the graph did on the device."""
        for stream in (self.keys_stream, self.values_stream):
            if kind == "append":
                stream.packed.advance(1)
            elif kind == "flush":
                stream.packed.advance(stream.step)
                stream.residual.n = stream.window + 1 - stream.step
            else:
                stream.residual.n += 1
        self.length += 1
        self.kernel_steps += 1



class GraphStepsCache:
    """The graph-step side of ``KVQCache`` (which owns ``layers`` and ``_lens``)."""

    def capturable(self) -> bool:
        """Every layer on one CUDA device and able to run graph steps (``KVQLayer.graph_capable``)."""
        devices = {layer.attn.k_proj.weight.device for layer in self.layers if layer.attn is not None}
        return (len(devices) == 1 and next(iter(devices)).type == "cuda"
                and all(layer.graph_capable() for layer in self.layers))

    def graph_kind(self) -> str | None:
        """The graph step the next token takes in every layer (``KVQLayer.graph_kind``; layers move in
        lockstep), or None for an eager step."""
        kinds = {layer.graph_kind() for layer in self.layers}
        return kinds.pop() if len(kinds) == 1 else None

    def enter_graph_step(self, kind: str) -> None:
        """Before a graph step of ``kind`` (capture or replay): the device counts for it (int64 ``[n_packed,
        n_res]`` as attention sees them after the token, the residual slot of a plain step, the packed offset of a
        flush), the layers in graph mode."""
        first = self.layers[0]
        ks = first.keys_stream
        if kind == "append":
            counts = [ks.packed.n + 1, 0, 0, ks.packed.n]
            for layer in self.layers:  # room for the token's outliers (the host's bookkeeping)
                for stream, fused in zip((layer.keys_stream, layer.values_stream), layer.fused, strict=True):
                    fused.reserve(stream.packed)
        elif kind == "flush":
            counts = [ks.packed.n + ks.step, ks.window + 1 - ks.step, 0, ks.packed.n]
        else:
            counts = [ks.packed.n, ks.residual.n + 1, ks.residual.n, ks.packed.n]
        counts = torch.tensor(counts, dtype=torch.int64)
        if self._lens is None:
            self._lens = torch.zeros(4, dtype=torch.int64, device=first.attn.k_proj.weight.device)
            for layer in self.layers:
                layer.fix_residual_capacity()
        self._lens.copy_(counts, non_blocking=True)
        for layer in self.layers:
            layer.lens, layer.captured = self._lens, kind

    def graph_signature(self) -> tuple:
        """The addresses of the buffers a captured step reads or writes that may be reallocated as the cache grows
        (sparse outliers): a graph captured with other addresses must be captured again."""
        sig = []
        for layer in self.layers:
            for stream in (layer.keys_stream, layer.values_stream):
                rows = stream.packed.outliers
                if rows is not None:
                    sig += [rows.val.data_ptr(), rows.idx.data_ptr(), rows.ptr.data_ptr()]
        return tuple(sig)

    def leave_graph_step(self) -> None:
        for layer in self.layers:
            layer.captured = None

    def graph_step_done(self, kind: str) -> None:
        self.leave_graph_step()
        for layer in self.layers:
            layer.graph_step_done(kind)
