#!/usr/bin/env bash
# GPU smoke test: a few NeMo and HF steps of an 8B-shaped Llama (random weights, nothing downloaded) on
# one GPU, then one table and smoke.json (step time, tokens/s, TFLOP/s, MFU, peak memory vs the
# recipes.memory estimate, GPU utilisation and power). From the repo root, either in the nemo:24.12 image
# built from Dockerfile.nemo, or on a bare CUDA host with the offline bundle (`make gpu-bundle`):
#
#   bash benchmarks/gpu_smoke.sh                       # LoRA, 4 of 32 layers, 8 steps per backend
#   bash benchmarks/gpu_smoke.sh --bundle dist/gpu-bundle   # install the bundle into a temp prefix first
#   bash benchmarks/gpu_smoke.sh --method both --layers 8 --steps 10 --output runs/gpu_smoke
#   bash benchmarks/gpu_smoke.sh --dry-run             # no GPU: configs, estimate and the commands only
#   bash benchmarks/gpu_smoke.sh --bundle DIR --rehearse   # every step with the tiny model, on any machine
#
# --bundle DIR: `pip install --no-index --no-deps --no-build-isolation --target PREFIX/site` of DIR's
# requirements.txt with the host's python (PYTHON, else python3), PREFIX/site first on PYTHONPATH; the host's
# environment is not changed. PREFIX is a temp dir removed at the end unless GPU_SMOKE_PREFIX names one (kept).
# Where the install fails (a source the bundle builds here, megatron-core on Python 3.12, needs a compiler and
# Python's headers), the rest is installed without those sources and the backends that need them are skipped.
# Everything else goes to `python -m benchmarks.gpu_smoke` (see its --help).
set -euo pipefail
cd "$(dirname "$0")/.."

bundle=""
args=()
dry_run=0  # also for --rehearse: neither needs a GPU
while [[ $# -gt 0 ]]; do
    case "$1" in
        --bundle) [[ $# -ge 2 ]] || { echo "error: --bundle needs a directory" >&2; exit 2; }; bundle=$2; shift 2 ;;
        --bundle=*) bundle=${1#--bundle=}; shift ;;
        *) [[ "$1" == "--dry-run" || "$1" == "--rehearse" ]] && dry_run=1; args+=("$1"); shift ;;
    esac
done

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -z "$bundle" && -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
for arg in "${args[@]}"; do
    if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then exec "$PY" -m benchmarks.gpu_smoke --help; fi
done

if [[ -n "$bundle" ]]; then
    [[ -f "$bundle/bundle.json" && -f "$bundle/requirements.txt" ]] || {
        echo "error: $bundle: not a bundle (no bundle.json / requirements.txt); make one with: make gpu-bundle" >&2; exit 2; }
    want=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["python"])' "$bundle/bundle.json")
    have=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
    if [[ "$want" != "$have" ]]; then
        echo "error: $bundle is for Python $want, $PY is $have (make gpu-bundle GPU_PYTHON=$have)" >&2; exit 2
    fi
    "$PY" -c "import torch" 2> /dev/null || {
        echo "error: $PY has no torch: the bundle needs a host with a CUDA build of PyTorch" >&2; exit 2; }
    if [[ -n "${GPU_SMOKE_PREFIX:-}" ]]; then
        prefix=$GPU_SMOKE_PREFIX
        mkdir -p "$prefix"
    else
        prefix=$(mktemp -d "${TMPDIR:-/tmp}/gpu-smoke.XXXXXX")
        trap 'rm -rf "$prefix"' EXIT
    fi
    echo "installing $bundle into $prefix/site (offline)"
    t0=$(date +%s)
    bundle_install() {
        # sources that compile (megatron-core on Python 3.12) are built here: setup.py calls `python3 -m pybind11`
        PATH="$(dirname "$("$PY" -c 'import sys; print(sys.executable)')"):$PATH" \
            "$PY" -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir --disable-pip-version-check \
            --quiet --upgrade --find-links "$bundle" --target "$prefix/site" -r "$1"
    }
    if ! bundle_install "$bundle/requirements.txt"; then
        # most likely a source the bundle builds here (no compiler or Python headers on this host): the rest is
        # installed without it, and the backends that need it are skipped (the table says which and why)
        not_built=$("$PY" -c 'import sys; from benchmarks.gpu_bundle import without_host_builds as w
print(",".join(w(*sys.argv[1:])))' "$bundle" "$prefix/requirements-no-build.txt")
        [[ -n "$not_built" ]] || { echo "error: installing $bundle failed (above)" >&2; exit 1; }
        echo "warning: installing $bundle failed (above); installing it without what it builds here: $not_built" >&2
        bundle_install "$prefix/requirements-no-build.txt"
        export GPU_SMOKE_NOT_BUILT="$not_built"
    fi
    echo "installed in $(( $(date +%s) - t0 )) s"
    export PYTHONPATH="$prefix/site${PYTHONPATH:+:$PYTHONPATH}"
    export GPU_SMOKE_BUNDLE="$bundle" GPU_SMOKE_INSTALL_S=$(( $(date +%s) - t0 ))
fi

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
"$PY" -m benchmarks.gpu_smoke ${args[@]+"${args[@]}"}
