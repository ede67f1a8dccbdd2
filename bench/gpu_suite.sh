#!/usr/bin/env bash
# Everything GPU-relevant in one command, JSON to $OUT (else bench/results), rows written as they come. Each
# part has a time limit (STEP_TIMEOUT overrides them all); PARTS picks some ("tests train engine epoch" is
# about 11 minutes on one H200, more than one 10-minute device call: split it):
#   tests      the GPU tests (device-resident data, CUDA-graph step = eager step, engine with graphs)
#   train      training throughput of ours / ours without CUDA graphs / timm / timm+channels_last /
#              transformers-example pipelines, 3 models x 32-224 px (mostly DataLoader worker start-up)
#   engine     train.py with configs/cpu_fast_cnn.yaml for 10 epochs on real CIFAR-10, CUDA graphs on and
#              off: accuracy and images/s of the whole engine (metrics + history to $OUT/engine_*)
#   epoch      one CIFAR-size epoch (50,000 images) of efficientnet_b0 at 224 px per pipeline, GPU utilisation
#   profile    torch.profiler of our training step at 32 and 224 px
#   scaling    epoch time vs training-set size (10/50/100 % of CIFAR-10's train split), train.py, one GPU
#   inference  eager, channels_last, torch.compile (efficientnet_b0 at 224 px); ONNX Runtime needs a CUDA
#              provider (onnxruntime-gpu) and is skipped without one
#
#   bash bench/gpu_suite.sh                         # needs the dataset at ../shared/datasets/cifar10-jpeg
#
# On a lent GPU machine (only the checkout travels, and its image has no `datasets` package): copy the data
# and the wheels into ignored folders of the checkout first, then carry them:
#   cp -r ../shared/datasets/cifar10-jpeg build/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       -d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pytest pluggy iniconfig pygments
#   run: bash bench/gpu_suite.sh   carry: build/cifar10-jpeg, .whl   timeout: 600 s
# Env: WORKERS (reference loaders' DataLoader workers, default nproc-2), STEP_TIMEOUT (seconds per part),
# TRAIN_ARGS (more train_throughput.py flags for part train). The whole training matrix took 384 s on an H200:
#   PARTS=train STEP_TIMEOUT=550 bash bench/gpu_suite.sh; then PARTS="tests engine epoch" (~4 min)
set -u
cd "$(dirname "$0")/.."
export OUT=${OUT:-bench/results} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then  # the carried wheels win over the image's own copies
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
WORKERS=${WORKERS:-$(( $(nproc) - 2 ))}
DATA=../shared/datasets/cifar10-jpeg; [ -d "$DATA" ] || DATA=build/cifar10-jpeg
PARTS=${PARTS:-tests train engine epoch profile scaling inference}
failed=0
part() {  # name, timeout, command...: a failing or slow part is reported and the suite goes on
  local name=$1 limit=$2; shift 2
  [[ " $PARTS " == *" $name "* ]] || return 0
  echo "== $name ($(date +%T), limit ${limit}s): $*"
  timeout "$limit" "$@" || { echo "!! $name failed or timed out (exit $?)"; failed=1; }
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, timm, transformers, datasets; print('torch', torch.__version__, 'timm', timm.__version__,
'transformers', transformers.__version__, 'datasets', datasets.__version__)"

engine() {  # the same recipe with CUDA graphs on and off
  for graphs in cuda-graphs no-cuda-graphs; do
    $PY train.py --config configs/cpu_fast_cnn.yaml --dataset "$DATA" --time-limit-minutes none --epochs 10 \
      --warmup-epochs 1 --"$graphs" --output-dir "/tmp/engine_$graphs" --overwrite-output-dir || return 1
    mkdir -p "$OUT/engine_$graphs" && cp /tmp/engine_$graphs/{metrics.json,history.jsonl} "$OUT/engine_$graphs/"
  done
}
export -f engine && export PY DATA

part tests "${STEP_TIMEOUT:-80}" $PY -m pytest -q -p no:cacheprovider -o addopts= tests/test_speed_paths.py
part train "${STEP_TIMEOUT:-550}" $PY bench/train_throughput.py --device cuda --workers "$WORKERS" \
  --batch-sizes 32:256,64:256,128:256,224:128 --steps 20 --warmup 2 --repeats 2 ${TRAIN_ARGS:-}
part engine "${STEP_TIMEOUT:-110}" bash -c engine
part epoch "${STEP_TIMEOUT:-150}" $PY bench/train_throughput.py --device cuda --workers "$WORKERS" \
  --pipelines ours timm hf --batch-sizes 224:128 --repeats 0 --epoch-images 50000 --epoch-size 224 \
  --name train_epoch_cuda
part profile "${STEP_TIMEOUT:-40}" $PY bench/profile_step.py --device cuda --sizes 32 224 --batch-size 256 --steps 10
part scaling "${STEP_TIMEOUT:-75}" $PY bench/scaling.py --device cuda --processes 1 --batch-size 256
part inference "${STEP_TIMEOUT:-75}" $PY bench/inference.py --device cuda --repeats 3 --min-seconds 0.3 \
  --backends eager channels_last compile onnxruntime --compile-cases efficientnet_b0@224 \
  --cases baseline_cnn_bn@32 efficientnet_b0@224
exit $failed
