"""Where a decode step's time goes (not a test): host (cProfile, cumulative) and device (torch.profiler).

    python bench/profile_step.py --model random:smollm2-135m --method kivi4 --context 4K --steps 32

Prefills ``--context`` random token ids through the cache (``--method``; none: the 16-bit DynamicCache), then
runs ``--steps`` warm-up decode steps, then profiles ``--steps`` more: first under cProfile (top functions by
cumulative time), then under torch.profiler (top ops by CPU and by CUDA time). Prints the step time of each.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

from kvq_cli.api import load_net
from kvq_cli.generate import greedy_steps
from kvq_cli.memory import parse_context
from kvq_cli.methods import parse_spec
from kvq_cli.models import load_config, resolve_model
from kvq_cli.runtime import load_cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:smollm2-135m")
    ap.add_argument("--method", default=None)
    ap.add_argument("--context", default="4K")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--rows", type=int, default=30)
    args = ap.parse_args()
    source = resolve_model(args.model)
    config = load_config(source)
    net, first = load_net(source, args.dtype, "cuda", None)
    n = parse_context(args.context)
    ids = torch.randint(0, config.vocab_size, (1, n), device=first)
    if args.method:
        cache = load_cache(parse_spec(args.method), net, max_tokens=n + 3 * args.steps + 8)
    else:
        from transformers import DynamicCache

        cache = DynamicCache(config=net.config)
    it = greedy_steps(net, cache, ids, 4096)

    def steps(k: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(k):
            int(next(it)[0])
        return (time.perf_counter() - start) / k

    steps(args.steps)  # prefill + warm-up
    prof = cProfile.Profile()
    prof.enable()
    t_cprof = steps(args.steps)
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(args.rows)
    print(out.getvalue())
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        t_torch = steps(args.steps)
    print(p.key_averages().table(sort_by="cpu_time_total", row_limit=args.rows))
    print(p.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows))
    t_plain = steps(args.steps)
    print(f"step ms: plain {1e3 * t_plain:.2f}, under cProfile {1e3 * t_cprof:.2f}, "
          f"under torch.profiler {1e3 * t_torch:.2f}")
    if hasattr(cache, "decode_steps"):
        print(cache.decode_steps())


if __name__ == "__main__":
    main()
