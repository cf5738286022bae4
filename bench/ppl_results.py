"""The calibration issue's result tables on one model: every method side by side with the same-run baseline.

Run on a GPU (the whole WikiText-2 raw test set takes minutes there); writes JSON and Markdown:

    python bench/ppl_results.py --data-dir ../shared/data --out docs/results/ppl-smollm2 [--max-windows N]

Tables: (1) main: baseline, int4/3/2, nf4/3, kivi4/2, kvquant 4/3/2/1 bits with 0% and 1% outliers;
(2) KVQuant ablation at 3 bits 1% (each component off in turn); (3) calibration shift on Tiny
Shakespeare (calibrated on WikiText-2 valid vs on the first half of Shakespeare; evaluated on the
second half, so calibration and evaluation text never overlap).
``--only fidelity``: issue 21's table, every method in one run: kvquant and kvquant-rot at 4/3/2 bits and under
``--avg-bits`` budgets (a spec ending ``@B``), cq and pq, and the calibration-free int, nf, kivi and turbo.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvq_cli import api  # noqa: E402
from kvq_cli.methods import parse_spec  # noqa: E402

MAIN_METHODS = ["int4", "int3", "int2", "nf4", "nf3", "kivi4", "kivi2"]
KVQ_BITS = [4, 3, 2, 1]
# issue 21: every method at every budget, one run, one baseline (``@B``: ``kvq calibrate --avg-bits B``)
FIDELITY_SPECS = [f"{m}:bits={b},outliers=0.01" for m in ("kvquant", "kvquant-rot") for b in (4, 3, 2)] + [
    f"{m}:outliers=0.01@{b}" for m in ("kvquant", "kvquant-rot") for b in (4.0, 3.0, 2.5)] + [
    # the outlier fraction under a budget: fewer outliers leave bits for wider codes
    "kvquant-rot:outliers=0@2.5", "kvquant-rot:outliers=0.005@2.5", "kvquant-rot:outliers=0.005@3.0",
    "kvquant-rot:outliers=0.02@3.0", "kvquant-rot:outliers=0.005@4.0"] + [
    "cq:channels=2,bits=8", "cq:channels=4,bits=8", "cq:channels=8,bits=8", "pq:bits=8", "pq:bits=8,subspaces=16"]
FIDELITY_METHODS = ["int4", "int3", "int2", "nf4", "nf3", "nf2", "kivi4", "kivi2", "turbo4", "turbo3", "turbo2"]
ABLATION = {  # name -> kvquant options at 3 bits, 1% outliers
    "all components": {},
    "post-RoPE keys": {"pre_rope": False},
    "per-token keys": {"per_channel": False},
    "uniform codebook (no NUQ)": {"nuq": False},
    "unweighted k-means (no Fisher)": {"fisher": False},
    "no Q-Norm": {"qnorm": False},
    "no attention sink": {"sink": 0},
    "no outliers": {"outliers": 0.0},
}


def spec(options: dict) -> str:
    return "kvquant:" + ",".join(f"{k}={v}" for k, v in options.items())


def calibrate(options: dict | str, out: Path, args, dataset: str = "wikitext2-valid") -> str:
    """Calibrate kvquant ``options`` (or any method spec string; ``spec@B``: under ``--avg-bits B``) into ``out``."""
    text, _, budget = (options if isinstance(options, str) else spec(options)).partition("@")
    info = api.calibrate(parse_spec(text), str(out), model=args.model, dataset=dataset, data_dir=args.data_dir,
                         samples=args.samples, seqlen=args.seqlen, avg_bits_budget=float(budget) if budget else None)
    print(f"  calibrated {info['name']} on {dataset} in {info['calibration']['seconds']} s", flush=True)
    return str(out)


def evaluate(dataset: str, artifacts: list[str], methods: list[str], args, mode: str = "simulated",
             max_windows: int | None = None) -> dict:
    t = time.perf_counter()
    res = api.eval_ppl(model=args.model, dataset=dataset, data_dir=args.data_dir, seqlen=args.seqlen,
                       max_windows=max_windows or args.max_windows, batch_size=args.batch_size, artifacts=artifacts,
                       methods=[parse_spec(m) for m in methods], mode=mode, chunk=args.chunk,
                       chunk_attention=args.chunk_attention)
    print(f"  evaluated {len(artifacts) + len(methods)} configurations in {time.perf_counter() - t:.0f} s", flush=True)
    return res


def table(res: dict, names: list[str] | None = None) -> str:
    rows = res["results"]
    base = rows[0]["perplexity"]
    lines = ["| configuration | avg bits | perplexity | Δ vs fp16 | KL (nats/token) | top-1 agreement |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for i, r in enumerate(rows):
        name = names[i] if names else r["name"]
        delta = "" if i == 0 else f"{(r['perplexity'] / base - 1) * 100:+.2f}%"
        lines.append(f"| {name} | {r['avg_bits']:.2f} | {r['perplexity']:.4f} | {delta} | "
                     f"{r['kl_divergence']:.5f} | {r['top1_agreement'] * 100:.2f}% |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="docs/results/ppl-smollm2")
    p.add_argument("--only", choices=["main", "ablation", "shift", "extras", "streaming", "cq", "fidelity"],
                   action="append")
    p.add_argument("--chunk", type=int, default=128, help="streaming: tokens per chunk")
    p.add_argument("--chunk-attention", default="full", choices=["full", "stored"],
                   help="streaming: a chunk attends to itself in full precision or as stored")
    p.add_argument("--streaming-windows", type=int, default=32, help="streaming: windows evaluated")
    p.add_argument("--specs", default=None,
                   help="cq, fidelity: ';'-separated method specs instead of the built-in list")
    args = p.parse_args()
    parts = args.only or ["main", "ablation", "shift"]
    tmp = Path(tempfile.mkdtemp(prefix="kvq-results-"))
    doc: dict = {"command": "python " + " ".join(sys.argv), "git": _git(), "results": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every part, so a cut-off run keeps what it measured
        out.with_suffix(".json").write_text(json.dumps(doc, indent=2))

    if "main" in parts:
        print("main table", flush=True)
        arts = [calibrate({"bits": b, "outliers": o}, tmp / f"kvq{b}-{o}.safetensors", args)
                for b in KVQ_BITS for o in (0.0, 0.01)]
        doc["results"]["main"] = evaluate("wikitext2", arts, MAIN_METHODS, args)
        save()
    if "ablation" in parts:
        print("ablation", flush=True)
        arts = [calibrate({"bits": 3, "outliers": 0.01, **o}, tmp / f"abl{i}.safetensors", args)
                for i, o in enumerate(ABLATION.values())]
        doc["results"]["ablation"] = evaluate("wikitext2", arts, [], args)
        doc["results"]["ablation"]["labels"] = ["fp16 baseline", *ABLATION]
        save()
    if "extras" in parts:  # per-token value ranges over all heads (KVQuant's, fewer bits); per-head codebooks
        print("extras", flush=True)
        variants = [{"token_scales": True}, {"head_codebooks": True}, {"token_scales": True, "head_codebooks": True}]
        arts = [calibrate({"bits": b, "outliers": 0.01, **v}, tmp / f"x{b}-{i}.safetensors", args)
                for i, v in enumerate(variants) for b in (4, 3, 2)]
        doc["results"]["extras"] = evaluate("wikitext2", arts, [], args)
        save()
    if "streaming" in parts:  # the packed runtime cache, chunk by chunk, beside simulated on the same windows
        print("streaming", flush=True)
        arts = [calibrate({"bits": b, "outliers": 0.01}, tmp / f"s{b}.safetensors", args) for b in (4, 3, 2)]
        methods = ["kivi4", "kivi2", "int4"]
        for mode in ("simulated", "streaming"):
            doc["results"][mode + "-side-by-side"] = evaluate("wikitext2", arts, methods, args, mode,
                                                              args.streaming_windows)
            save()
    if "cq" in parts:  # coupled and product quantization beside kvquant at similar bits (calibrated the same way)
        print("cq/pq", flush=True)
        specs = ["cq:channels=2,bits=8", "cq:channels=4,bits=8", "cq:channels=8,bits=8", "cq:channels=8,bits=10",
                 "cq:channels=8,bits=8,outliers=0.01", "pq:bits=8", "pq:bits=8,subspaces=16",
                 "kvquant:bits=2,outliers=0.01",  # kvquant 4/3-bit and kivi: the main table, same protocol
                 # PQ beyond MILLION (CPU screen, docs/results/cq-pq-screening-cpu.md): fp16 sink token,
                 # per-head codebooks, 1% sparse outliers
                 "pq:bits=8,sink=1", "pq:bits=8,sink=1,head_codebooks=true",
                 "pq:bits=8,sink=1,head_codebooks=true,outliers=0.01", "pq:bits=8,sink=1,outliers=0.01",
                 # CQ at 1 bit: post-RoPE keys; longer k-means on 4x the vectors
                 "cq:channels=8,bits=8,pre_rope=false", "cq:channels=8,bits=8,kmeans_iters=50,max_samples=65536"]
        specs = args.specs.split(";") if args.specs else specs
        arts = [calibrate(s, tmp / f"cq{i}.safetensors", args) for i, s in enumerate(specs)]
        doc["cq_specs"] = specs
        doc["results"]["cq"] = evaluate("wikitext2", arts, [], args)
        save()
    if "fidelity" in parts:
        print("fidelity (issue 21)", flush=True)
        specs = args.specs.split(";") if args.specs else FIDELITY_SPECS
        arts = [calibrate(s, tmp / f"f{i}.safetensors", args) for i, s in enumerate(specs)]
        doc["fidelity_specs"] = specs
        doc["results"]["fidelity"] = evaluate("wikitext2", arts, FIDELITY_METHODS, args)
        save()
    if "shift" in parts:
        print("calibration shift", flush=True)
        text = (Path(args.data_dir) / "tiny-shakespeare.txt").read_text()
        half = len(text) // 2
        (tmp / "calib.txt").write_text(text[:half])
        (tmp / "eval.txt").write_text(text[half:])
        shift = {}
        for bits in (3, 2):
            o = {"bits": bits, "outliers": 0.01}
            wiki = calibrate(o, tmp / f"wiki{bits}.safetensors", args)
            shak = calibrate(o, tmp / f"shak{bits}.safetensors", args, dataset=str(tmp / "calib.txt"))
            res = evaluate(str(tmp / "eval.txt"), [wiki, shak], [], args)
            res["labels"] = ["fp16 baseline", f"kvquant-{bits}b-1% calibrated on WikiText-2 valid",
                             f"kvquant-{bits}b-1% calibrated on Shakespeare (first half)"]
            shift[f"{bits}b"] = res
            doc["results"]["shift"] = shift
            save()
    out.with_suffix(".md").write_text(render(doc) + "\n")
    print(render(doc))


def render(doc: dict) -> str:
    parts = []
    for key, res in doc["results"].items():
        for sub, r in ({key: res} if "results" in res else res).items():
            dataset = Path(r["dataset"]).name
            parts.append(f"### {sub}: {r['model']}, {dataset}, {r['windows']} windows x {r['seqlen']} tokens, "
                         f"{r['mode']}, {r['dtype']}, {r['device']}")
            parts.append(table(r, r.get("labels")))
    return "\n\n".join(parts)


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


if __name__ == "__main__":
    main()
