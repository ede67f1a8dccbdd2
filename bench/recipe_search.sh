#!/usr/bin/env bash
# Recipe search for the CPU time-to-accuracy presets, run where it is cheap (a GPU, fp32 so the numbers carry
# over to a CPU): accuracy per epoch depends on the recipe, not the device. Each run writes history.jsonl +
# metrics.json; bench/collect_runs.py gathers them into one JSON. The CPU wall time of a recipe is then
# images x (CPU images/s), measured separately on the 2-core box (bench/train_throughput.py).
#   DATA=build/cifar10-jpeg LITE0=.gpu/lite0_imagenet_fp16.safetensors bash bench/recipe_search.sh
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=${OUT:-bench/results}; RUNS=${RUNS:-/tmp/recipe_runs}; DATA=${DATA:-../shared/datasets/cifar10-jpeg}
LITE0=${LITE0:-}
PY=${PYTHON:-python3}
mkdir -p "$OUT" "$RUNS"
common=(--dataset "$DATA" --mixed-precision no --eval-batch-size 1000 --early-stopping-patience 0 --seed 0)
cnn=(--no-pretrained --optimizer sgd --momentum 0.9 --weight-decay 5e-4 --scheduler cosine --warmup-epochs 0.5
     --label-smoothing 0.1 --augment basic --shift 0.125 --zoom 0 --batch-size 256)
run() { local name=$1; shift; echo "== $name"; timeout 120 $PY train.py "${common[@]}" "$@" --output-dir "$RUNS/$name" --overwrite-output-dir 2>&1 \
        | grep -aE "(epoch [0-9]+:|test:|error)" ; }
run cnn_e3 --model baseline_cnn_bn "${cnn[@]}" --lr 0.1 --epochs 3
run cnn_e5 --model baseline_cnn_bn "${cnn[@]}" --lr 0.1 --epochs 5
run cnn_small_e8 --model baseline_cnn_bn_small "${cnn[@]}" --lr 0.1 --epochs 8
run cnn_small_e12 --model baseline_cnn_bn_small "${cnn[@]}" --lr 0.1 --epochs 12
if [ -n "$LITE0" ]; then
  ft=(--model tf_efficientnet_lite0 --weights "$LITE0" --scheduler cosine --warmup-epochs 0.2 --label-smoothing 0.1
      --augment basic --shift 0.125 --zoom 0 --drop-rate 0.2)
  run lite0_64_e1_adam --image-size 64 "${ft[@]}" --optimizer adamw --lr 1e-3 --weight-decay 0.02 --batch-size 64 --epochs 1
  run lite0_64_e2_adam --image-size 64 "${ft[@]}" --optimizer adamw --lr 1e-3 --weight-decay 0.02 --batch-size 64 --epochs 2
  run lite0_64_e2_sgd --image-size 64 "${ft[@]}" --optimizer sgd --lr 0.05 --weight-decay 5e-5 --batch-size 64 --epochs 2
  run lite0_96_e1_adam --image-size 96 "${ft[@]}" --optimizer adamw --lr 1e-3 --weight-decay 0.02 --batch-size 64 --epochs 1
  run lite0_96_e2_adam --image-size 96 "${ft[@]}" --optimizer adamw --lr 1e-3 --weight-decay 0.02 --batch-size 64 --epochs 2
  run lite0_128_e1_adam --image-size 128 "${ft[@]}" --optimizer adamw --lr 1e-3 --weight-decay 0.02 --batch-size 64 --epochs 1
  run lite0_64_half_adam --image-size 64 "${ft[@]}" --optimizer adamw --lr 1e-3 --weight-decay 0.02 --batch-size 64 --epochs 1 --max-train-samples 22500
  run lite0_probe_128 --image-size 128 --model tf_efficientnet_lite0 --weights "$LITE0" --linear-probe --epochs 30 --lr 1e-3 --batch-size 512 --weight-decay 1e-4
fi
$PY bench/collect_runs.py "$RUNS" --output "$OUT/recipe_search.json"
