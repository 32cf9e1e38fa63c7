#!/usr/bin/env bash
# Everything one device call does, in order: unpack the Python packages the GPU machine lacks, then
# run the named stages. What comes back is two files under $OUT (the device tool returns at most 8 files of
# 16 MiB each): log.txt, and run.tar.xz holding results/ (laws, points, plots, benchmark log), the MLflow
# store, any search's Optuna study (.scaling/checkpoints/NAME/optuna.db: carry it back to continue the study)
# and the GPU utilisation samples, packed again after every stage so a cut-off call still returns them.
#   run.sh bench                      runners.bench.moe_layer moe_layer, runners.bench.step dense_step moe_step
#   run.sh bench:NAME                 runners.bench.step NAME only (dense_step or moe_step)
#   run.sh step:ARG,ARG,...           runners.bench.step with these arguments, e.g. step:dense_step,--d-model,768,--profile
#   run.sh "pack:ARGS"                runners.bench.pack with these arguments, space-separated, e.g. "pack:--graph --mps --d-model 64"
#   run.sh multigpu:SPEC              SPEC on one GPU, then on all: wall time, speedup, per-GPU busy fraction
#   run.sh packing:SPEC               SPEC on one GPU, a trial at a time, then packed at its share
#   run.sh packing-mps:SPEC           the same, packed under NVIDIA MPS
#   run.sh sweep:SPEC                 scaling run SPEC (Ray + MLflow, all GPUs), its export, its GPU use (sweepstats)
#   run.sh pack_sweep:PACKED,UNPACKED both sweeps trained (as sweep: but no export), then runners.bench.pack_sweep
#   run.sh tokenize:SOURCE,TOKENIZER  runners.bench.tokenize (encode_batch against encode_batch_fast on 16 cores)
#   run.sh test:PATH,PATH,...         pytest on these (the GPU-only tests: models.swiglu's and models.flash4's kernels)
#   run.sh stash-fa4                  keep .fa4/a's piece of FlashAttention-4 on the machine for the next call
# MPS=1 runs every stage under an NVIDIA MPS daemon of the call's own (kernels of separate processes, such as a
# sweep's packs, then share the GPU's SMs at once instead of taking turns); the sweep figures say mps: true.
# DEADLINE (seconds from the start, default 540) stops a sweep's training with Ctrl-C; its finished trials
# stay finished in the MLflow store, are exported, and the next call resumes the rest.
# Carry [".gpu", ".data"]: .gpu/site.tar.xz from runners/bench/device/build-bundle.sh; .data holds the corpus
# slice and, between calls, the MLflow store (.data/mlflow.db) so a later call skips finished trials.
# FlashAttention-4 (runners/bench/device/build-fa4.sh) travels in two calls: `stash-fa4` with carry [".fa4/a"], then,
# while the machine is warm, this with ".fa4/b" added to the carry; without it, attention runs on torch's SDPA.
set -uo pipefail
cd "$(dirname "$0")/../../.."
if [ "${1:-}" = stash-fa4 ]; then mkdir -p /tmp/fa4p && cp .fa4/a/part.00 /tmp/fa4p/ && exit 0; fi
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" .data
mkdir -p /tmp/site && { [ -d /tmp/site/ray ] || tar -xJf .gpu/site.tar.xz -C /tmp/site; }
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
if [ -f .fa4/b/part.01 ] && [ -f /tmp/fa4p/part.00 ]; then
  mkdir -p /tmp/fa4site && { [ -d /tmp/fa4site/flash_attn ] || cat /tmp/fa4p/part.00 .fa4/b/part.01 | xz -d | tar -x -C /tmp/fa4site; }
  export PYTHONPATH=$PYTHONPATH:/tmp/fa4site:/tmp/fa4site/nvidia_cutlass_dsl/dsl_packages  # (and what its .pth adds)
fi
start=$SECONDS; DEADLINE=${DEADLINE:-540}
work=/tmp/device-run; mkdir -p $work
[ -f .data/mlflow.db ] && cp .data/mlflow.db $work/mlflow.db   # the store a previous call brought back
export MLFLOW_TRACKING_URI=sqlite:///$work/mlflow.db SCALING_CACHE=$PWD/.data/cache PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee $work/gpus.txt
if [ "${MPS:-0}" = 1 ]; then
  export CUDA_MPS_PIPE_DIRECTORY=$work/mps-pipe CUDA_MPS_LOG_DIRECTORY=$work/mps-log
  mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY && nvidia-cuda-mps-control -d
fi
nvidia-smi --query-gpu=timestamp,index,utilization.gpu,memory.used --format=csv,noheader -lms 1000 > $work/gpu_util.csv &
monitor=$!
status=0
for stage in "$@"; do
  echo "=== $stage $(date -u +%T)"
  case $stage in
    bench) python -m runners.bench.moe_layer moe_layer && python -m runners.bench.step dense_step moe_step ;;
    bench:*) python -m runners.bench.step "${stage#bench:}" ;;
    step:*) args=${stage#step:}; python -m runners.bench.step ${args//,/ } ;;
    pack:*) python -m runners.bench.pack ${stage#pack:} ;;
    tokenize:*) args=${stage#tokenize:}; python -m runners.bench.tokenize ${args//,/ } ;;
    test:*) args=${stage#test:}; python -m pytest -q -p no:cacheprovider -W ignore ${args//,/ } ;;
    multigpu:*|packing:*) python -m runners.bench.sweep "${stage%%:*}" "${stage#*:}" --util $work/gpu_util.csv ;;
    packing-mps:*) python -m runners.bench.sweep packing "${stage#*:}" --util $work/gpu_util.csv --mps ;;
    # training under the deadline, then the export (whatever finished) outside it
    sweep:*) timeout --signal=INT $((DEADLINE - (SECONDS - start))) python -m runners.cli run "${stage#sweep:}" --no-fit
             python -m runners.cli export "${stage#sweep:}"
             python -m runners.bench.sweepstats "${stage#sweep:}" --util $work/gpu_util.csv ;;
    pack_sweep:*) specs=${stage#pack_sweep:}
             for spec in ${specs//,/ }; do
               timeout --signal=INT $((DEADLINE - (SECONDS - start))) python -m runners.cli run "$spec" --no-fit
               python -m runners.bench.sweepstats "$spec" --util $work/gpu_util.csv
             done
             python -m runners.bench.pack_sweep ${specs//,/ } ;;
    *) echo "unknown stage $stage"; false ;;
  esac 2>&1 | tee -a "$OUT/log.txt" | tail -40
  [ "${PIPESTATUS[0]}" = 0 ] || status=1
  (cd $work && ls mlflow.db gpu_util.csv gpus.txt 2>/dev/null) > $work/packed.txt   # no store after benchmarks alone
  tar -cf - results $(ls .scaling/checkpoints/*/optuna.db 2>/dev/null) -C $work -T $work/packed.txt | xz -T0 -6 > "$OUT/run.tar.xz.part" && mv "$OUT/run.tar.xz.part" "$OUT/run.tar.xz"
done
kill $monitor
[ "${MPS:-0}" = 1 ] && echo quit | nvidia-cuda-mps-control
exit $status
