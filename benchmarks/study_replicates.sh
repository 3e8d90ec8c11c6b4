#!/usr/bin/env bash
# A pre-registered study, one sweep per stage-1 replicate, in order; a replicate already copied into its results
# folder is skipped, an unfinished one resumes (--resume-if-exists). Each finished run's results.json is copied there
# unread (temp file, then rename), to be committed.
#   STUDY=study (default; docs/study.md, Deviations 2026-12-03): label-free then labelled for replicate 0, then 1 … 4,
#     into docs/study-results/<kind>-rep<r>.json; transfer in the replicate-0 runs only.
#   STUDY=study2 (docs/study2.md): sweeps/study2.yaml for replicates 0 … 4, into docs/study2-results/rep<r>.json.
#   bash benchmarks/study_replicates.sh [--dry-run]
# STUDY_CLONE: the frozen clone the sweeps run from (default ../study, `git clone . ../study`); RUNS: where the run
# directories live, outside the work tree (default ../runs); SPARSECSE_DATA_DIR as for any sweep.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
study="${STUDY:-study}"
case "$study" in
  study) kinds="labelfree labelled"; results="$repo/docs/study-results" ;;
  study2) kinds="study2"; results="$repo/docs/study2-results" ;;
  *) echo "STUDY=$study: choose study or study2" >&2; exit 2 ;;
esac
clone="$(cd "${STUDY_CLONE:-$repo/../study}" && pwd)"
runs="${RUNS:-$repo/../runs}"
dry=$([ "${1:-}" = "--dry-run" ] && echo 1 || echo 0)
[ "$dry" = 1 ] || mkdir -p "$results" "$runs"
for r in 0 1 2 3 4; do
  for kind in $kinds; do
    if [ "$study" = study ]; then
      config="sweeps/study-$kind.yaml"; dst="$results/$kind-rep$r.json"; run="$runs/study-$kind-rep$r"
      transfer=$([ "$r" = 0 ] && echo selected || echo none)  # transfer (descriptive) in the replicate-0 runs only
    else
      config="sweeps/$kind.yaml"; dst="$results/rep$r.json"; run="$runs/$kind-rep$r"; transfer=none
    fi
    [ -f "$dst" ] && continue
    cmd=(python -m sparsecse sweep "$config" --set sweep.replicates=1 --set "train.seed=$((42 + r))"
         --set "sweep.seeds=[$((1 + 1000 * r))]" --set "eval.transfer=$transfer" --out "$run" --resume-if-exists)
    if [ "$dry" = 1 ]; then echo "${cmd[*]}"; continue; fi
    echo "=== $kind replicate $r: $(date -u)"
    (cd "$clone" && PYTHONPATH="$clone" nice -n 10 "${cmd[@]}")
    cp "$run/results.json" "$dst.tmp" && mv "$dst.tmp" "$dst"
    echo "=== $kind replicate $r finished: $(date -u)"
  done
done
