#!/usr/bin/env bash
# The GPU time-to-accuracy rows in ONE device call (~8-9.5 min on one H200): our gpu_fast_cnn preset over 5 seeds
# against airbench94.py (unchanged), our gpu_transfer preset (Lite0) against timm's train.py on the same weights
# and images; JSON into $OUT (bench/gpu_time_to_accuracy.py does the work; its header lists the parts).
#
# Before the call, here on the CPU (fills the ignored build/gpu/: data, Lite0 weights, wheels, reference scripts;
# checks that the tree + build/gpu stay under the tool's 64 MiB):
#   python bench/prepare_gpu_run.py      # needs the git mirrors of the two reference repos: see its header
#   SMOKE=1 bash bench/gpu_time_to_accuracy.sh   # the rehearsal on the CPU: ~3 min, results in /tmp/gtta/out
# The device call (the `run` tool's arguments):
#   command: bash bench/gpu_time_to_accuracy.sh     carry: ["build/gpu"]     timeout_s: 600
# Part limits in seconds (bench/gpu_time_to_accuracy.py LIMITS; expected durations in brackets, not measured):
# tests 45 [~25], prepare 60 [~25], fast_cnn 130 [~85: 5 processes of ~17 s], airbench94 45 [45: as many runs as fit],
# transfer 150 [~110], timm 200 [~190], then cnn96 90 [~50] if 60 s of the 560 s budget are left; plus ~15 s of
# wheel install and imports. No part runs past the budget, and the JSON is rewritten after every part, so a
# killed call still returns what finished. PARTS="..." picks parts (a rerun of one; "b0" where its weights are).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline GRADIO_ANALYTICS_ENABLED=False
PY=${PYTHON:-python3}
if [ "${SMOKE:-0}" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""  # the rehearsal never touches a GPU, even where one is
elif ! $PY -c "import datasets" 2>/dev/null && ls build/gpu/wheels/*.whl >/dev/null 2>&1; then
  # the device image lacks `datasets` (the engine's parquet reader): the carried wheels, as the device README says
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    build/gpu/wheels/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
[ "${SMOKE:-0}" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, timm, accelerate, datasets; print('torch', torch.__version__, 'timm', timm.__version__,
'accelerate', accelerate.__version__, 'datasets', datasets.__version__)" || exit 1
# shellcheck disable=SC2086  # PARTS is a list of words
exec $PY bench/gpu_time_to_accuracy.py ${PARTS:+--parts $PARTS} "$@"
