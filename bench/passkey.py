"""Passkey retrieval through the packed cache: SmolLM2 at several contexts, depths and seeds (not a test).

    python bench/passkey.py --data-dir ../shared/data --out docs/results/passkey-smollm2 \
        [--contexts 2048,4096,8192] [--depths 0.1,0.3,0.5,0.7,0.9] [--seeds 0,1,2] [--artifacts DIR]

Configurations: the 16-bit DynamicCache baseline, kvquant 4/3/2-bit-1% (artifacts calibrated with the
calibration issue's protocol, 16 x 2048 WikiText-2 valid tokens, made in --artifacts when missing), kivi4
and kivi2. Each prompt (``kvq_cli.prompts.haystack_prompt``) is prefilled 4096 tokens at a time and 8
tokens are generated greedily (the loop of ``kvq generate``, ``kvq_cli.generate.run``, over a batch of
every depth and seed of one context: all prompts have exactly N tokens); the answer is the first number
in them. Decoding uses the PyTorch reference path (``use_kernel=False``) so every
configuration runs the same code; the Triton path is compared in ``bench/kernel_greedy.py``.
Writes ``OUT.json`` (every trial) and ``OUT.md`` (retrieval counts beside the baseline).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvq_cli import api
from kvq_cli.artifact import load as load_artifact
from kvq_cli.data import load_text
from kvq_cli.generate import greedy_steps
from kvq_cli.methods import parse_spec
from kvq_cli.models import load_model, load_tokenizer, resolve_model
from kvq_cli.prompts import haystack_prompt, passkey_answer
from kvq_cli.runtime import load_cache

KVQUANT = {f"kvquant-{b}b-1%": f"kvquant:bits={b},outliers=0.01" for b in (4, 3, 2)}
TUNING_FREE = {"kivi-4b": "kivi4", "kivi-2b": "kivi2"}


def configurations(art_dir: Path, data_dir: str, device: str) -> dict[str, object]:
    """name -> None (baseline), a (method, states) pair; kvquant artifacts calibrated when missing."""
    out: dict[str, object] = {"baseline": None}
    art_dir.mkdir(parents=True, exist_ok=True)
    for name, spec in KVQUANT.items():
        path = art_dir / f"{name.replace('%', 'pct')}.safetensors"
        if not path.is_file():
            api.calibrate(parse_spec(spec), str(path), model="smollm2-135m", data_dir=data_dir, device=device)
        art = load_artifact(path)
        out[name] = (art.method, art.states)
    for name, spec in TUNING_FREE.items():
        out[name] = (parse_spec(spec), None)
    return out


@torch.inference_mode()
def trial(net, config, ids: torch.Tensor, new_tokens: int = 8, chunk: int = 4096) -> list[list[int]]:
    """Greedy continuations of a batch of equal-length prompts ``ids (B, N)``: ``kvq generate``'s loop
    (``generate.greedy_steps``) over a batch. Returns ``B`` lists of ``new_tokens`` ids."""
    if config is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=net.config)
    else:
        cache = load_cache(config, net, batch_size=ids.shape[0], max_tokens=ids.shape[1] + new_tokens)
        for layer in cache.layers:
            layer.use_kernel = False
    try:
        steps = greedy_steps(net, cache, ids, chunk)
        return torch.stack([next(steps) for _ in range(new_tokens)], 1).tolist()
    finally:
        if hasattr(cache, "unbind"):
            cache.unbind()


def markdown(rows: list[dict], names: list[str], contexts: list[int], depths: list[float], header: str) -> str:
    def count(name, **where):
        sel = [r for r in rows if r["configuration"] == name and all(r[k] == v for k, v in where.items())]
        return sum(r["correct"] for r in sel), len(sel)

    lines = [header, "", "Retrieved / trials (depths x seeds) per context:", "",
             "| configuration | " + " | ".join(f"{c:,} tokens" for c in contexts) + " | all |",
             "|---|" + "---:|" * (len(contexts) + 1)]
    for name in names:
        cells = [count(name, context=c) for c in contexts]
        total = count(name)
        lines.append(f"| {name} | " + " | ".join(f"{a}/{n}" for a, n in cells) + f" | {total[0]}/{total[1]} |")
    lines += ["", "By depth (all contexts):", "", "| configuration | " + " | ".join(f"{d:g}" for d in depths) + " |",
              "|---|" + "---:|" * len(depths)]
    for name in names:
        cells = [count(name, depth=d) for d in depths]
        lines.append(f"| {name} | " + " | ".join(f"{a}/{n}" for a, n in cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", required=True, help="path stem: writes OUT.json and OUT.md")
    ap.add_argument("--contexts", default="2048,4096,8192")
    ap.add_argument("--depths", default="0.1,0.3,0.5,0.7,0.9")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--artifacts", default="passkey-artifacts", help="folder for the kvquant artifacts")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    device = api.resolve_device("auto")
    dtype = "bfloat16" if device == "cuda" else "float32"
    configs = configurations(Path(args.artifacts), args.data_dir, device)
    source = resolve_model("smollm2-135m")
    tok, net = load_tokenizer(source), load_model(source, dtype, device)
    filler = load_text("war-and-peace", args.data_dir)
    rows, start = [], time.perf_counter()
    for context in contexts:  # one batch per context: every depth and seed (all prompts have N tokens)
        cases = [(d, s) for d in depths for s in seeds]
        prompts = [haystack_prompt(tok, filler, context, d, s) for d, s in cases]
        ids = torch.cat([p.ids for p in prompts]).to(device)
        for name, config in configs.items():
            for (depth, seed), prompt, new in zip(cases, prompts, trial(net, config, ids), strict=True):
                text = tok.decode(new, skip_special_tokens=True)
                answer = passkey_answer(text)
                rows.append(dict(configuration=name, context=context, depth=depth, seed=seed, passkey=prompt.passkey,
                                 answer=answer, correct=answer == prompt.passkey, text=text))
            done = [r for r in rows if r["context"] == context and r["configuration"] == name]
            print(f"context {context} {name}: {sum(r['correct'] for r in done)}/{len(done)}", flush=True)
    machine = api._device_name(device)
    header = (f"Machine: {machine}; SmolLM2-135M-Instruct in {dtype}; {time.perf_counter() - start:.0f} s.\n\n"
              f"Command: `python bench/passkey.py --data-dir <shared/data> --out <stem> --contexts {args.contexts} "
              f"--depths {args.depths} --seeds {args.seeds}`")
    Path(args.out + ".json").write_text(json.dumps({"machine": machine, "dtype": dtype, "rows": rows}, indent=1))
    md = markdown(rows, list(configs), contexts, depths, header)
    Path(args.out + ".md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
