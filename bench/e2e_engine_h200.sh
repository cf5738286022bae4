#!/usr/bin/env bash
# End-to-end decode through the engine on one GPU (not a test): `kvq generate` on random-weight SmolLM2-135M and
# Llama-3-8B shapes, the 16-bit StaticCache and the packed caches in one command, each with its printed summary.
# Run on the device machine from the repository root: bash bench/e2e_engine_h200.sh  (OUT: where JSON goes)
# Results: docs/results/decode-e2e-h200.md.
OUT=${OUT:-/tmp/e2e}; mkdir -p "$OUT"
PY=python3
$PY -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | grep -v WARNING | tail -2
KVQ="$(dirname $($PY -c 'import sys;print(sys.executable)'))/kvq"
export HF_HUB_OFFLINE=1
show() { $PY -c "
import json,sys; d=json.load(open(sys.argv[1])); keys=('configuration','time_to_first_token_s','first_step_seconds','decode_tokens_per_s','graph_steps','eager_steps','graph_captures','kernel_steps','reference_steps')
print(sys.argv[2], {k: (round(d[k],3) if isinstance(d[k],float) else d[k]) for k in keys if k in d}, d['notes'][:1])" $1 $2; }
$KVQ calibrate --model random:smollm2-135m --method kvquant --bits 3 --outliers 0.01 --samples 4 --seqlen 1024 --out /tmp/smol-k3.safetensors > $OUT/cal1.txt 2>&1 || tail -5 $OUT/cal1.txt
$KVQ calibrate --model random:llama-3-8b --method kvquant --bits 2 --outliers 0.01 --samples 2 --seqlen 1024 --out /tmp/l8b-k2.safetensors > $OUT/cal2.txt 2>&1 || tail -5 $OUT/cal2.txt
$KVQ calibrate --model random:llama-3-8b --method cq:fisher=false,kmeans_iters=4 --samples 2 --seqlen 1024 --out /tmp/l8b-cq.safetensors > $OUT/cal3.txt 2>&1 || tail -5 $OUT/cal3.txt
$KVQ calibrate --model random:llama-3-8b --method pq:kmeans_iters=4 --samples 2 --seqlen 1024 --out /tmp/l8b-pq.safetensors > $OUT/cal4.txt 2>&1 || tail -5 $OUT/cal4.txt
run() { name=$1; shift; timeout 240 $KVQ generate "$@" --json > $OUT/$name.json 2>$OUT/err-$name.txt || tail -8 $OUT/err-$name.txt; show $OUT/$name.json $name; }
run smol-fp16 --model random:smollm2-135m --context 4K --max-new-tokens 256
run smol-kvq3 --model random:smollm2-135m --artifact /tmp/smol-k3.safetensors --context 4K --max-new-tokens 256
run smol-kivi4 --model random:smollm2-135m --method kivi4 --context 4K --max-new-tokens 256
run smol-kivi2 --model random:smollm2-135m --method kivi2 --context 4K --max-new-tokens 256
run smol-kvq3-eager --model random:smollm2-135m --artifact /tmp/smol-k3.safetensors --context 4K --max-new-tokens 256 --no-graphs
run l8b-kvq2-128k --model random:llama-3-8b --artifact /tmp/l8b-k2.safetensors --context 128K --max-new-tokens 64 --chunk 8192
run l8b-kivi2-128k --model random:llama-3-8b --method kivi2 --context 128K --max-new-tokens 64 --chunk 8192
run l8b-int2-128k --model random:llama-3-8b --method int2 --context 128K --max-new-tokens 64 --chunk 8192
run l8b-cq-128k --model random:llama-3-8b --artifact /tmp/l8b-cq.safetensors --context 128K --max-new-tokens 64 --chunk 8192
run l8b-pq-128k --model random:llama-3-8b --artifact /tmp/l8b-pq.safetensors --context 128K --max-new-tokens 64 --chunk 8192
run l8b-fp16-128k --model random:llama-3-8b --context 128K --max-new-tokens 64 --chunk 8192
if [ -n "$E2E_1M" ]; then  # 1M: the cache filled with random keys and values (--fill random; no 1M prefill)
  run l8b-kivi2-1m --model random:llama-3-8b --method kivi2 --context 1M --max-new-tokens 32 --chunk 65536 --fill random
  run l8b-kvq2-1m --model random:llama-3-8b --artifact /tmp/l8b-k2.safetensors --context 1M --max-new-tokens 32 --chunk 65536 --fill random
fi
# same-command ratios against the 16-bit StaticCache of each shape (the guard against the next regression), and
# each run's share of the bandwidth roofline: (weights + cache bytes) per step at this GPU's copy bandwidth
$PY - "$OUT" <<'PY'
import json, pathlib, sys
import torch
x = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
y = torch.empty_like(x)
for _ in range(3):
    y.copy_(x)
a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
a.record()
for _ in range(10):
    y.copy_(x)
b.record()
torch.cuda.synchronize()
bw = 10 * 2 * x.numel() / (a.elapsed_time(b) / 1e3)
print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
runs = {p.stem: json.loads(p.read_text()) for p in pathlib.Path(sys.argv[1]).glob("*.json")}
for name, r in sorted(runs.items()):
    if r.get("decode_tokens_per_s") and r.get("weights_bytes"):
        step = r["weights_bytes"] + r["cache_bytes"]
        print(f"{name:18s} roofline {bw / step:7.1f} tok/s  measured {r['decode_tokens_per_s']:7.1f}  "
              f"{100 * r['decode_tokens_per_s'] * step / bw:5.1f}% of it  (weights {r['weights_bytes'] / 2**30:.2f} GiB "
              f"+ cache {r['cache_bytes'] / 2**30:.2f} GiB a step, avg bits {r.get('avg_bits', 0):.2f})")
for name, r in sorted(runs.items()):
    base = runs.get(name.split("-")[0] + "-fp16" + ("-128k" if name.endswith("-128k") else ""))
    if base and r.get("decode_tokens_per_s") and base.get("decode_tokens_per_s"):
        ratio = r["decode_tokens_per_s"] / base["decode_tokens_per_s"]
        print(f"{name:18s} {r['configuration']:20s} {r['decode_tokens_per_s']:8.1f} tok/s  {ratio:5.2f}x  "
              f"graph {r['graph_steps']}/{r['graph_steps'] + r['eager_steps']}  reference {r['reference_steps']}")
PY
