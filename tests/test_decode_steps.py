"""No silent fallbacks: every configuration the Triton decode kernels express decodes with zero PyTorch-reference
layer-steps over a multi-step generation (kernels under the interpreter on the CPU), and the others are counted
and named."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # must precede the first triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from conftest import tiny_model  # noqa: E402

from kvq_cli import load_cache  # noqa: E402
from kvq_cli.calibration.capture import capture  # noqa: E402
from kvq_cli.generate import run  # noqa: E402
from kvq_cli.methods import make_method, parse_spec  # noqa: E402

pytest.importorskip("triton")

#: (label, method options, calibrated): the configurations the kernels express
KERNEL_CONFIGS = [
    ("kvquant-3b-2%", dict(name="kvquant", bits=3, outliers=0.02, fisher=False, kmeans_iters=3), True),
    ("kvquant-2b-0%", dict(name="kvquant", bits=2, outliers=0.0, fisher=False, kmeans_iters=3), True),
    ("kivi-2b", dict(name="kivi", bits=2, residual=32, group=32), False),
    ("kivi-4b-g16", dict(name="kivi", bits=4, residual=16, group=16), False),
    ("kivi-2b-g64", dict(name="kivi", bits=2, residual=64, group=64), False),
    ("cq-4c8b", dict(name="cq", channels=4, bits=8, fisher=False, kmeans_iters=3), True),
    ("pq", dict(name="pq", bits=7, residual=5, kmeans_iters=3), True),
    ("int4", dict(name="int", bits=4), False),
    ("int3-sink-res", dict(name="int", bits=3, sink=4, residual=8), False),
    ("int8-res", dict(name="int", bits=8, residual=3), False),
    ("nf4", dict(name="nf", bits=4), False),
    ("nf2-sink-res", dict(name="nf", bits=2, sink=2, residual=5), False),
]


def _source(model, ids, opts: dict, calibrated: bool):
    opts = dict(opts)
    method = make_method(opts.pop("name"), **opts)
    if not calibrated:
        return method
    return method, [method.fit(s) for s in capture(model, ids[:, :48], method)]


def _decode(model, source, new_tokens: int = 6, use_kernel: bool | None = True) -> dict:
    ids = torch.randint(0, 320, (1, 70), generator=torch.Generator().manual_seed(5))
    cache = load_cache(source, model, max_tokens=ids.shape[1] + new_tokens)
    for layer in cache.layers:
        layer.use_kernel = use_kernel
    out = run(model, cache, ids, max_new_tokens=new_tokens, chunk=32, eos=set())
    cache.unbind()
    return {**cache.decode_steps(), "decode_steps": out["decode_steps"], "layers": len(cache.layers)}


@pytest.mark.parametrize("label, opts, calibrated", KERNEL_CONFIGS, ids=[c[0] for c in KERNEL_CONFIGS])
def test_kernel_configurations_never_fall_back(label, opts, calibrated):
    model = tiny_model("llama")
    ids = torch.randint(0, 320, (1, 64), generator=torch.Generator().manual_seed(2))
    steps = _decode(model, _source(model, ids, opts, calibrated))
    assert steps["decode_steps"] == 5
    assert steps["reference_steps"] == 0, steps["reference_reason"]
    assert steps["kernel_steps"] == steps["layers"] * steps["decode_steps"]


@pytest.mark.parametrize("spec, why", [("kivi:bits=2,group=8,residual=16", "group 8")])
def test_reference_steps_are_counted_and_named(spec, why):
    """Configurations without a kernel (yet) are not hidden: every decode layer-step is counted with its reason."""
    model = tiny_model("llama")
    steps = _decode(model, parse_spec(spec))
    assert steps["kernel_steps"] == 0 and steps["reference_steps"] == steps["layers"] * steps["decode_steps"]
    assert why in steps["reference_reason"]


def test_kernels_switched_off_are_named():
    steps = _decode(tiny_model("llama"), parse_spec("kivi2"), use_kernel=False)
    assert steps["kernel_steps"] == 0 and "off" in steps["reference_reason"]
