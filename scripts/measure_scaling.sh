#!/usr/bin/env bash
# The data-parallel measurements of results/scaling.md, on the GPUs of one host, in one call:
#
#   bash scripts/measure_scaling.sh OUT_DIR GPU_COUNTS [IMAGENETTE_ARRAYS]
#   bash scripts/measure_scaling.sh results/raw 1,2,4,8 artifacts/imagenette_128.npz
#
# 1. Training img/s of resnet50, hybrid_resnet50 (C,C,L,L) and lambda_resnet50 at 160 px, bf16,
#    batch 128 and 256 per GPU, on each count of GPU_COUNTS (scripts/benchmark.py --scaling),
#    with BatchNorm statistics over the global batch (sync_batch_norm True) and per device
#    (False; the same program on one GPU, so not repeated when GPU_COUNTS is 1):
#    OUT_DIR/scaling_160.jsonl, one JSON line per measurement.
# 2. With IMAGENETTE_ARRAYS (scripts/make_arrays.py's file): 200 steps of
#    configs/imagenette.py:resnet50 (global batch 256) on 1 GPU and on the largest count, from the
#    same initialisation; console logs (`[step] train_loss=...` every 10 steps, then the final
#    evaluation) in OUT_DIR/data_parallel_<N>gpu.log.
set -euo pipefail
out=$1 counts=$2 arrays=${3:-}
mkdir -p "$out"

syncs="true false"
[[ $counts == 1 ]] && syncs=true
for model in resnet50 hybrid_resnet50 lambda_resnet50; do
  for batch in 128 256; do
    for sync in $syncs; do
      python3 scripts/benchmark.py --model "$model" --modes train --image-size 160 \
        --batch-size "$batch" --scaling "$counts" --warmup 5 --windows 3 --steps 20 \
        --config-overrides "{\"sync_batch_norm\": $sync}" | grep '^{' >>"$out/scaling_160.jsonl" ||
        echo "measure_scaling.sh: $model, batch $batch, sync_batch_norm $sync failed" >&2
    done
  done
done

[[ -z $arrays ]] && exit 0
largest=$(tr , '\n' <<<"$counts" | sort -n | tail -1)
for n in $(printf '%s\n' 1 "$largest" | sort -nu); do
  CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) python3 -m lambdanet.main \
    --config=configs/imagenette.py:resnet50 --config.dataset.path="$arrays" \
    --config.num_train_steps=200 --config.log_every_steps=10 --config.eval_every_epochs=0 \
    --workdir="workdir/data_parallel_${n}gpu" >"$out/data_parallel_${n}gpu.log" 2>&1
done
