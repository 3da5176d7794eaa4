#!/usr/bin/env bash
# The data-parallel measurements of results/scaling.md, on the GPUs of one host:
#
#   [DEADLINE_S=540] bash scripts/measure_scaling.sh OUT_DIR GPU_COUNTS [IMAGENETTE_ARRAYS]
#   bash scripts/measure_scaling.sh results/raw 1,2,4,8 artifacts/imagenette_128.npz
#
# 1. With IMAGENETTE_ARRAYS (scripts/make_arrays.py's file): 200 steps of the config
#    imagenette:resnet50 (global batch 256) on 1 GPU and on the largest count, from the
#    same initialisation; console logs (`[step] train_loss=...` every 10 steps, then the final
#    evaluation) in OUT_DIR/data_parallel_<N>gpu.log.
# 2. Training img/s of resnet50, hybrid_resnet50 (C,C,L,L) and lambda_resnet50 at 160 px, bf16,
#    batch 256 and then 128 per GPU, on each count of GPU_COUNTS (scripts/benchmark.py
#    --config=default:MODEL --scaling, one process per count, so the one-GPU base of each
#    efficiency is of the same call), with BatchNorm statistics over the global batch
#    (--config.sync_batch_norm=true) and per device (false; the
#    same program on one GPU, so not repeated when GPU_COUNTS is 1): OUT_DIR/scaling_160.jsonl.
#
# Resumable: what OUT_DIR already holds is not measured again. With DEADLINE_S, no measurement
# starts that the previous one's duration says would end after DEADLINE_S seconds; run the same
# command again (on 8 GPUs, each of the 12 measurements should take about 4 x 50 s, mostly
# compiling, from the ~50 s a count took on one H200).
set -euo pipefail
out=$1 counts=$2 arrays=${3:-} deadline=${DEADLINE_S:-0}
mkdir -p "$out"
results=$out/scaling_160.jsonl
touch "$results"
start=$SECONDS last=0

fits() { ((deadline == 0 || SECONDS - start + last <= deadline)); }

largest=$(tr , '\n' <<<"$counts" | sort -n | tail -1)
if [[ -n $arrays ]]; then
  for n in $(printf '%s\n' 1 "$largest" | sort -nu); do
    log=$out/data_parallel_${n}gpu.log
    if grep -q "Final metrics" "$log" 2>/dev/null; then continue; fi
    CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) python3 -m lambdanet.main \
      --config=imagenette:resnet50 --config.dataset.path="$arrays" \
      --config.num_train_steps=200 --config.log_every_steps=10 --config.eval_every_epochs=0 \
      --workdir="workdir/data_parallel_${n}gpu" >>"$log" 2>&1  # a resumed run keeps its log
  done
fi

syncs="true false"
[[ $counts == 1 ]] && syncs=true
for batch in 256 128; do
  for model in resnet50 hybrid_resnet50 lambda_resnet50; do
    for sync in $syncs; do
      # This measurement's line for the largest count is in the results: it is done.
      if grep -F "\"config\": \"default:$model\"," "$results" |
        grep -F "\"batch_size\": $((batch * largest))," | grep -F "\"num_devices\": $largest," |
        grep -qF "\"sync_batch_norm\": $sync}"; then
        continue
      fi
      if ! fits; then
        echo "measure_scaling.sh: stopped at the deadline; run the same command again" >&2
        exit 75
      fi
      began=$SECONDS
      python3 scripts/benchmark.py --config="default:$model" --modes=train --image-size=160 \
        --batch-size="$batch" --scaling="$counts" --warmup=5 --windows=3 --steps=20 \
        --config.sync_batch_norm="$sync" | grep '^{' >>"$results" ||
        echo "measure_scaling.sh: $model, batch $batch, sync_batch_norm $sync failed" >&2
      last=$((SECONDS - began))
    done
  done
done
