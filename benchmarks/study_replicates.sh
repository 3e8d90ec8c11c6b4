#!/usr/bin/env bash
# The pre-registered study (docs/study.md, Deviations 2026-12-03), one sweep per replicate, in order: label-free then
# labelled for replicate 0, then 1, … 4. A replicate already copied into docs/study-results/ is skipped; an
# unfinished one resumes (--resume-if-exists). Each finished run's results.json is copied there unread (temp file,
# then rename), to be committed.
#   bash benchmarks/study_replicates.sh [--dry-run]
# STUDY_CLONE: the frozen clone the sweeps run from (default ../study, `git clone . ../study`); RUNS: where the run
# directories live, outside the work tree (default ../runs); SPARSECSE_DATA_DIR as for any sweep.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
clone="$(cd "${STUDY_CLONE:-$repo/../study}" && pwd)"
runs="${RUNS:-$repo/../runs}"
results="$repo/docs/study-results"
dry=$([ "${1:-}" = "--dry-run" ] && echo 1 || echo 0)
[ "$dry" = 1 ] || mkdir -p "$results" "$runs"
for r in 0 1 2 3 4; do
  for kind in labelfree labelled; do
    dst="$results/$kind-rep$r.json"
    [ -f "$dst" ] && continue
    transfer=$([ "$r" = 0 ] && echo selected || echo none)  # transfer (descriptive) in the replicate-0 runs only
    cmd=(python -m sparsecse sweep "sweeps/study-$kind.yaml" --set sweep.replicates=1 --set "train.seed=$((42 + r))"
         --set "sweep.seeds=[$((1 + 1000 * r))]" --set "eval.transfer=$transfer" --out "$runs/study-$kind-rep$r"
         --resume-if-exists)
    if [ "$dry" = 1 ]; then echo "${cmd[*]}"; continue; fi
    echo "=== $kind replicate $r: $(date -u)"
    (cd "$clone" && PYTHONPATH="$clone" nice -n 10 "${cmd[@]}")
    cp "$runs/study-$kind-rep$r/results.json" "$dst.tmp" && mv "$dst.tmp" "$dst"
    echo "=== $kind replicate $r finished: $(date -u)"
  done
done
