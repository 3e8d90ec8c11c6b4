#!/usr/bin/env bash
# The first sweep under Ray on a lent GPU machine (torch, no Ray), in one call of at most 8 minutes:
#   bash benchmarks/gpu_sweep.sh [OUT]            (from the repository root; `run`'s carry: .whl and .carry)
# Before carrying: `bash ../shared/tools/ray-wheels-for-gpu.sh` builds .whl/ (a stripped Ray and what it lacks) and
#   mkdir -p .carry/data/senteval/STS .carry/data/senteval && cp -r ../shared/data/wiki .carry/data/ &&
#   cp -r ../shared/data/senteval/STS/STSBenchmark .carry/data/senteval/STS/ && cp -r ../shared/data/senteval/SICK .carry/data/senteval/
# copies the few data files it reads (STS-B, SICK, the wiki sample). What it runs: benchmarks/gpu_sweep.py.
set -euo pipefail
OUT=${1:-${OUT:-gpu-sweep}}
if ! python3 -c 'import ray' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
timeout 470 python3 -m benchmarks.gpu_sweep --device cuda --shape bert-base --data-dir .carry/data --out "$OUT" \
  --steps "${STEPS:-300}"
