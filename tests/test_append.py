"""The fused kvquant quantize-and-append (``kvq_kernels.append``, Triton's interpreter on CPU) against the
runtime's PyTorch path (the method's encode, bit packing, ``SparseRows.append``): the same bytes in every
buffer, for keys per channel and per token, values with KVQuant's per-token outliers over all heads, 1-4 bits,
odd head counts, a head whose entries are all outliers, and tokens appended one by one after a prefill."""

import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from kvq_cli.methods import make_method  # noqa: E402
from kvq_cli.methods.quant_ops import fp16_ceil, fp16_floor  # noqa: E402
from kvq_cli.runtime.fused import FusedAppend  # noqa: E402
from kvq_cli.runtime.storage import Stream  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _state(gen, h, d, bits):
    """Random sorted fp16-exact codebooks and fp16-rounded per-channel thresholds."""
    book = lambda: torch.sort(torch.rand(1 << bits, generator=gen) * 2 - 1).values.half().float()  # noqa: E731
    lo = fp16_floor(-0.5 - torch.rand(h, d, generator=gen)).float()
    hi = fp16_ceil(0.5 + torch.rand(h, d, generator=gen)).float()
    return {k: v.to(DEV) for k, v in dict(key_codebook=book(), value_codebook=book(), key_lo=lo, key_hi=hi).items()}


def _streams(method, state, x, prefill, fused):
    """Key and value streams fed ``x (B, H, T, D)``: ``prefill`` tokens at once through the PyTorch encode,
    then one token at a time (through the fused writer when ``fused``)."""
    out = []
    for key in (True, False):
        s = Stream(method, key, sink=1, window=0, step=1, capacity=None)
        enc = method.encode_keys if key else method.encode_values
        s.append(x[:, :, :prefill], state, enc)
        writer = FusedAppend(method, key) if fused else None
        for t in range(prefill, x.shape[2]):
            s.append(x[:, :, t : t + 1], state, enc, writer)
        out.append(s)
    return out


def _same(a: Stream, b: Stream) -> None:
    pa, pb = a.packed, b.packed
    assert pa.n == pb.n and set(pa.fields) == set(pb.fields)
    for name, f in pa.fields.items():
        assert torch.equal(f.view(), pb.fields[name].view()), name
    if pa.outliers is None:
        assert pb.outliers is None
        return
    ra, rb = pa.outliers, pb.outliers
    assert ra.n == rb.n and torch.equal(ra.counts(), rb.counts())
    npt = -(-ra.n // ra.block) + 1
    assert torch.equal(ra.ptr[..., :npt], rb.ptr[..., :npt])
    for r in range(ra.val.shape[0] * ra.val.shape[1]):
        i, j = divmod(r, ra.val.shape[1])
        c = int(ra.counts()[i, j])
        assert torch.equal(ra.val[i, j, :c], rb.val[i, j, :c]) and torch.equal(ra.idx[i, j, :c], rb.idx[i, j, :c])
    assert torch.equal(torch.stack(ra.dense()), torch.stack(rb.dense()))


@pytest.mark.parametrize("bits,h,d,opts", [
    (2, 3, 16, dict(outliers=0.05)),
    (3, 2, 32, dict(outliers=0.02)),
    (4, 3, 16, dict(outliers=0.0)),
    (1, 1, 32, dict(outliers=0.1)),
    (2, 3, 16, dict(outliers=0.05, per_channel=False)),
])
def test_fused_append_equals_encode(bits, h, d, opts):
    gen = torch.Generator().manual_seed(7 * bits + h + d)
    method = make_method("kvquant", bits=bits, sink=1, **opts)
    state = _state(gen, h, d, bits)
    b, t, prefill = 2, 75, 9  # tokens cross a 64-token pointer block
    x = (torch.randn(b, h, t, d, generator=gen) * 1.2).to(DEV)
    x[1, 0, 20] = 0.1  # a token without key outliers in head 0
    ref = _streams(method, state, x, prefill, fused=False)
    got = _streams(method, state, x, prefill, fused=True)
    for a, g in zip(ref, got, strict=True):
        _same(a, g)
    if opts["outliers"]:
        assert int(ref[0].packed.outliers.counts().sum()) > 0 and int(ref[1].packed.outliers.counts().sum()) > 0


def test_fused_append_head_of_outliers_and_capacity_growth():
    """A head whose every entry is among the token's top outliers keeps its own range; the rows' capacity
    grows (and the counts are read back) while tokens arrive one by one."""
    gen = torch.Generator().manual_seed(3)
    h, d, bits = 32, 16, 2
    method = make_method("kvquant", bits=bits, sink=0, outliers=0.1)  # 26 per side of 512 entries
    state = _state(gen, h, d, bits)
    x = torch.randn(1, h, 40, d, generator=gen).to(DEV)
    x[:, 5] += 20.0  # head 5: the 16 largest entries of every token
    ref = _streams(method, state, x, 0, fused=False)
    got = _streams(method, state, x, 0, fused=True)
    for a, g in zip(ref, got, strict=True):
        _same(a, g)
    assert bool((got[1].packed.fields["scale"].view()[0, 5] > 0).all())


def test_fused_append_applies_only_where_exact():
    assert FusedAppend.applies(make_method("kvquant", bits=2), True)
    assert not FusedAppend.applies(make_method("kvquant", bits=2, head_codebooks=True), True)
    assert not FusedAppend.applies(make_method("kvquant", bits=2, token_scales=True), False)
    assert FusedAppend.applies(make_method("kvquant", bits=2, token_scales=True), True)
    assert not FusedAppend.applies(make_method("kivi", bits=2), True)


HOPPER_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kvq_kernels.append import _append_kernel

ptr = dict(X="*fp32", LO="*fp32", HI="*fp32", MID="*fp32", CODES="*u8", SCALE="*fp16", ZERO="*fp16",
           VAL="*fp16", IDX="*i16", PTR="*i32", AT="*i64")
for key, out, bits, dyn in ((True, True, 3, False), (False, True, 2, True), (False, False, 4, False)):
    consts = dict(D=128, HP=8, BITS=bits, IS_KEY=key, OUT=out, SB=64, DYN=dyn)
    sig = {n: ptr.get(n, "constexpr" if n in consts else "i32") for n in _append_kernel.arg_names}
    done = triton.compile(ASTSource(fn=_append_kernel, signature=sig, constexprs=consts),
                          target=GPUTarget("cuda", 90, 32))
    assert "ptx" in done.asm
print("compiled")
"""


def test_append_kernel_compiles_for_hopper():
    """The interpreter accepts code the GPU compiler refuses (non-constexpr globals, integer widths): compile the
    kernel for sm_90 on the CPU (the ptxas in the triton wheel), outside the interpreter (a subprocess)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", HOPPER_COMPILE], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
