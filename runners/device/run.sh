#!/usr/bin/env bash
# Everything one device call does, in order: unpack the Python packages the GPU machine lacks, then
# run the named stages; logs, results, the MLflow store and the benchmark log are copied under $OUT.
#   run.sh bench                      models.bench moe_layer, runners.step_bench dense_step moe_step
#   run.sh multigpu:SPEC              SPEC on one GPU, then on all: wall time, speedup, per-GPU busy fraction
#   run.sh sweep:SPEC                 scaling run SPEC (Ray + MLflow, all GPUs)
# DEADLINE (seconds from the start, default 540) stops a sweep with Ctrl-C in time to copy what it made:
# its finished trials stay finished in the MLflow store, and the next call resumes the rest.
# Carry [".gpu", ".data"]: .gpu/site.tar.xz from runners/device/build-bundle.sh; .data holds the corpus
# slice and, between calls, the MLflow store (.data/mlflow.db) so a later call skips finished trials.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" .data
mkdir -p /tmp/site && { [ -d /tmp/site/ray ] || tar -xJf .gpu/site.tar.xz -C /tmp/site; }
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
start=$SECONDS; DEADLINE=${DEADLINE:-540}
[ -f .data/mlflow.db ] && cp .data/mlflow.db "$OUT/mlflow.db"   # the store a previous call brought back
export MLFLOW_TRACKING_URI=sqlite:///$OUT/mlflow.db SCALING_CACHE=$PWD/.data/cache
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader -lms 1000 > "$OUT/gpu_util.csv" &
monitor=$!
status=0
for stage in "$@"; do
  echo "=== $stage $(date -u +%T)"
  case $stage in
    bench) python -m models.bench moe_layer && python -m runners.step_bench dense_step moe_step ;;
    multigpu:*) python -m runners.device.multigpu "${stage#multigpu:}" --util "$OUT/gpu_util.csv" ;;
    sweep:*) timeout --signal=INT $((DEADLINE - (SECONDS - start))) python -m runners.cli run "${stage#sweep:}" ;;
    *) echo "unknown stage $stage"; false ;;
  esac 2>&1 | tee -a "$OUT/log.txt" | tail -40
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  cp -r results "$OUT/"
done
kill $monitor
exit $status
