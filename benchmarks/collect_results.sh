#!/usr/bin/env bash
# Copy the comparison runs' evidence (config, metrics, held-out evaluations; no checkpoints) into
# benchmarks/results/compare_cpu/ (or DST) and regenerate the report there:
#   bash benchmarks/collect_results.sh [runs/compare_cpu] [DST]
#   bash benchmarks/collect_results.sh runs/adaptive_cpu/weak8 benchmarks/results/adaptive_cpu/weak8
set -euo pipefail
src=${1:-runs/compare_cpu}
dst=${2:-benchmarks/results/compare_cpu}
mkdir -p "$dst"
for run in "$src"/*/; do
  [ -f "$run/metrics.jsonl" ] || continue
  name=$(basename "$run")
  mkdir -p "$dst/$name"
  cp "$run"/config.json "$run"/metrics.jsonl "$dst/$name/"
  cp "$run"/eval-step*.json "$dst/$name/" 2>/dev/null || true
done
for extra in "$src"/eval-cold-start; do
  [ -d "$extra" ] && mkdir -p "$dst/$(basename "$extra")" && cp "$extra"/eval.json "$extra"/eval.md "$dst/$(basename "$extra")/" 2>/dev/null || true
done
"$(dirname "$0")/../.venv/bin/hicra-report" "$dst" --out "$dst/report"
