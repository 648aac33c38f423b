#!/usr/bin/env bash
# GPU smoke test: a few NeMo and HF steps of an 8B-shaped Llama (random weights, nothing downloaded) on
# one GPU in about 10 minutes, then one table (step time, tokens/s, TFLOP/s, MFU, peak memory vs the
# recipes.memory estimate). Run it in the nemo:24.12 image built from Dockerfile.nemo, from the repo root:
#
#   bash benchmarks/gpu_smoke.sh                       # LoRA, 4 of 32 layers, 8 steps per backend
#   bash benchmarks/gpu_smoke.sh --method both --layers 8 --steps 10 --output runs/gpu_smoke
#   bash benchmarks/gpu_smoke.sh --dry-run             # no GPU: configs, estimate and the commands only
#
# Everything after the script name goes to `python -m benchmarks.gpu_smoke` (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python; fi
fi

dry_run=0
for arg in "$@"; do
    if [[ "$arg" == "--dry-run" ]]; then dry_run=1; fi
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then exec "$PY" -m benchmarks.gpu_smoke --help; fi
done

if [[ $dry_run -eq 0 ]]; then
    if ! command -v nvidia-smi > /dev/null 2>&1; then
        echo "error: nvidia-smi not found: this smoke test needs a GPU (use --dry-run to see what it would do)" >&2
        exit 2
    fi
    nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv
    # one GPU: both backends are single-device runs; the first visible GPU unless the caller chose one
    export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}
fi

# timed runs: one OpenMP thread per process; nothing from a model hub
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PY" -m benchmarks.gpu_smoke "$@"
