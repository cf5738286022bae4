"""Greedy tokens through the Triton decode path equal the PyTorch reference path's (SmolLM2; not a test).

    python bench/kernel_greedy.py --data-dir ../shared/data --out docs/results/kernel-greedy-smollm2.json \
        [--artifacts passkey-artifacts] [--tokens 32]

For each configuration the kernels cover exactly (``kvq_cli.runtime.kernel_path``: kvquant without sparse
outliers, kivi with 32-token groups) and a few prompts (WikiText-2 test, War and Peace, a passkey haystack),
the same prompt is prefilled and ``--tokens`` tokens are generated greedily twice: once with
``use_kernel=True`` (the Triton decode kernels; the number of kernel calls is counted, so a silent fallback
shows) and once with ``use_kernel=False`` (the blockwise PyTorch reference). Without CUDA, run it with
``TRITON_INTERPRET=1``: the kernels then run on the CPU (slowly; use ``--prompts`` and ``--configs``).
Prints and writes the first position where they differ (none: equal).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from kvq_cli import api
from kvq_cli.artifact import load as load_artifact
from kvq_cli.data import load_text
from kvq_cli.generate import run
from kvq_cli.methods import parse_spec
from kvq_cli.models import load_model, load_tokenizer, resolve_model
from kvq_cli.prompts import fit_tokens, haystack_prompt
from kvq_cli.runtime import cache as cache_module
from kvq_cli.runtime import load_cache

CALIBRATED = {"kvquant-4b": "kvquant:bits=4,outliers=0", "kvquant-2b": "kvquant:bits=2,outliers=0",
              "kvquant-4b-1%": "kvquant:bits=4,outliers=0.01"}  # KVQuant's own outliers: fused append too
TUNING_FREE = {"kivi-4b": "kivi4", "kivi-2b": "kivi2"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", required=True)
    ap.add_argument("--artifacts", default="passkey-artifacts")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--configs", default=",".join([*CALIBRATED, *TUNING_FREE]), help="comma-separated subset")
    ap.add_argument("--prompts", default="wikitext2-1024,war-and-peace-4096,haystack-8192")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on CUDA, float32 on the CPU (interpreter: "
                    "run with TRITON_INTERPRET=1)")
    args = ap.parse_args()
    chosen = args.configs.split(",")
    device = api.resolve_device("auto")
    art_dir = Path(args.artifacts)
    art_dir.mkdir(parents=True, exist_ok=True)
    configs = {}
    for name, spec in CALIBRATED.items():
        if name not in chosen:
            continue
        path = art_dir / (f"{name}.safetensors" if "%" in name else f"{name}-0pct.safetensors").replace("%", "pct")
        if not path.is_file():
            api.calibrate(parse_spec(spec), str(path), model="smollm2-135m", data_dir=args.data_dir, device=device)
        art = load_artifact(path)
        configs[name] = (art.method, art.states)
    configs.update({name: (parse_spec(spec), None) for name, spec in TUNING_FREE.items() if name in chosen})
    source = resolve_model("smollm2-135m")
    dtype = args.dtype if args.dtype != "auto" else "bfloat16" if device == "cuda" else "float32"
    tok, net = load_tokenizer(source), load_model(source, dtype, device)
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompts = {
        "wikitext2-1024": fit_tokens(enc(load_text("wikitext2", args.data_dir)[:20000]), 1024),
        "war-and-peace-4096": fit_tokens(enc(load_text("war-and-peace", args.data_dir)[:100000]), 4096),
        "haystack-8192": haystack_prompt(tok, load_text("war-and-peace", args.data_dir), 8192, 0.5, 0).ids[0].tolist(),
    }
    calls = [0]
    original = cache_module.kernel_decode

    def counted(*a, **k):
        out = original(*a, **k)
        calls[0] += out is not None
        return out

    cache_module.kernel_decode = counted
    rows = []
    prompts = {k: v for k, v in prompts.items() if k in args.prompts.split(",")}
    for pname, ids in prompts.items():
        x = __import__("torch").tensor([ids], device=device)
        for cname, config in configs.items():
            got = {}
            for use in (True, False):
                calls[0] = 0
                cache = load_cache(config, net, max_tokens=len(ids) + args.tokens)
                for layer in cache.layers:
                    layer.use_kernel = use
                try:
                    got[use] = (run(net, cache, x, args.tokens, 4096, eos=set())["new_ids"], calls[0])
                finally:
                    cache.unbind()
            (kern, n_calls), (ref, _) = got[True], got[False]
            first = next((i for i, (a, b) in enumerate(zip(kern, ref, strict=True)) if a != b), None)
            rows.append(dict(prompt=pname, configuration=cname, equal=first is None, first_difference=first,
                             kernel_calls=n_calls, tokens=len(kern), text=tok.decode(kern)))
            print(f"{pname:20s} {cname:12s} equal={first is None} first_diff={first} kernel_calls={n_calls}",
                  flush=True)
    Path(args.out).write_text(json.dumps({"machine": api._device_name(device), "dtype": dtype, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
