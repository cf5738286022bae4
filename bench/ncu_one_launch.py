"""One decode-attention launch at 128K for Nsight Compute (not a test: run it by hand on a GPU).

    ncu --clock-control none --profile-from-start off --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section WarpStateStats --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats \\
        python bench/ncu_one_launch.py kivi-2b llama3-8b [F16_DOTS=False ...]

METHOD is one of ``bench_decode_attention.METHODS``, MODEL ``llama2-7b`` (MHA) or ``llama3-8b`` (GQA); extra
``NAME=VALUE`` arguments set the module switches of ``kvq_kernels.decode_attention``. Three warm-up calls, then the
profiled one between ``cudaProfilerStart`` / ``Stop``.
"""

import ast
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import kvq_kernels.decode_attention as da  # noqa: E402
from bench_decode_attention import METHODS, random_kivi, random_kvquant  # noqa: E402

name, model = sys.argv[1], sys.argv[2]
for kv in sys.argv[3:]:
    k, v = kv.split("=")
    setattr(da, k, ast.literal_eval(v))
h, g, d = {"llama2-7b": (32, 1, 128), "llama3-8b": (8, 4, 128)}[model]
cfg = METHODS[name]
cache = (random_kvquant if cfg["kind"] == "kvquant" else random_kivi)(1, h, d, 131072, cfg)
q = torch.randn(1, h * g, d, device="cuda", dtype=torch.float16)
fn = da.decode_attention_kvquant if cfg["kind"] == "kvquant" else da.decode_attention_kivi
for _ in range(3):
    fn(q, cache)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
fn(q, cache)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
