"""Two diagnostics quoted in docs/results (CPU is enough):

* ``split``: perplexity with only the keys or only the values of an artifact quantized (which side limits);
* ``outliers``: per layer, the fraction of pre-RoPE key entries outside the artifact's calibrated thresholds.

    python bench/kvquant_diagnostics.py split A.safetensors --data-dir ../shared/data --windows 1
    python bench/kvquant_diagnostics.py outliers A.safetensors --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvq_cli import artifact as artifact_io  # noqa: E402
from kvq_cli.data import load_text, tokenize, windows  # noqa: E402
from kvq_cli.hf_attention import attention_layers, split_heads  # noqa: E402
from kvq_cli.models import load_model, load_tokenizer, resolve_model  # noqa: E402
from kvq_cli.perplexity import Configuration, evaluate  # noqa: E402


def split(net, ids, art) -> list[dict]:
    """Baseline, both quantized, keys only, values only."""
    cls = type(art.method)

    class KeysOnly(cls):
        def fake_quant_values(self, v, state):
            return v

    class ValuesOnly(cls):
        def fake_quant_keys(self, k, state):
            return k

    cfg = dataclasses.asdict(art.method)
    configs = [Configuration("both", art.method, art.states), Configuration("keys only", KeysOnly(**cfg), art.states),
               Configuration("values only", ValuesOnly(**cfg), art.states)]
    return evaluate(net, ids, configs)


@torch.no_grad()
def outliers(net, ids, art) -> dict[int, float]:
    """Fraction of pre-RoPE keys (sink token excluded) outside [key_lo, key_hi], per layer."""
    fractions, handles = {}, []
    for i, attn in enumerate(attention_layers(net)):
        def hook(_m, _inp, out, i=i, attn=attn):
            k = split_heads(out, attn.head_dim)[:, :, 1:]  # (B, H, T-1, D)
            lo, hi = art.states[i]["key_lo"][:, None], art.states[i]["key_hi"][:, None]
            fractions[i] = ((k < lo) | (k > hi)).float().mean().item()

        handles.append(attn.k_proj.register_forward_hook(hook))
    net(ids)
    for h in handles:
        h.remove()
    return fractions


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["split", "outliers"])
    p.add_argument("artifact")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=1)
    p.add_argument("--skip", type=int, default=0, help="windows to skip first")
    args = p.parse_args()
    source = resolve_model(None)
    net = load_model(source)
    art = artifact_io.load(args.artifact)
    ids = windows(tokenize(load_text("wikitext2", args.data_dir), load_tokenizer(source)), args.seqlen,
                  args.skip + args.windows)[args.skip:]
    result = split(net, ids, art) if args.what == "split" else outliers(net, ids, art)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
