#!/usr/bin/env bash
# Issue 17's GPU figures, as one run on a lent device machine; results in bench/results/gpu/.
#
# The device machine has Python 3.12 with PyTorch and JAX for CUDA, but no TensorFlow, no Keras and
# no network. So its figures are for JAX and PyTorch (TensorFlow's wheel, ~600 MB, cannot travel: a
# call carries 64 MiB), and what cnnkit needs beyond that machine's packages travels in .gpu/ (ignored
# by git), with the CIFAR-10 JPEG archive:
#
#   bash bench/gpu.sh --prepare      here, once (pip reaches PyPI): wheels + ../shared's CIFAR-10 archive
#   then the device tool: run(command="bash bench/gpu.sh", carry=[".gpu"], timeout_s=600)
#   (or "bash bench/gpu.sh tta" and "bash bench/gpu.sh backends", one part per call)
#
# On the device it runs, with the `fast` recipe's mixed precision (float16 on a GPU):
#   1. bench/time_to_accuracy.py on JAX: --time-budget $GPU_BUDGETS (default 1m,2m), no tutorial
#      (it needs TensorFlow's tf.data); the time to 90% is in its table;
#   2. bench/backends.py on jax and torch: fast, simple, vgg, float32 and mixed, $GPU_IMAGES (5000) images;
# each under its own timeout (about 4.5 minutes in all), copying its results and log to $OUT as it
# ends (the device tool brings them back; a part cut short keeps the other's).
# Locally (a CPU check of this script): GPU_PYTHON=python GPU_SKIP_WHEELS=1 GPU_BUDGETS=90s GPU_IMAGES=500
set -uo pipefail
cd "$(dirname "$0")/.."
STAGE=.gpu
PYTHON=${GPU_PYTHON:-python3}

if [[ "${1:-}" == "--prepare" ]]; then
    set -e
    mkdir -p "$STAGE"
    keras_version=$("$PYTHON" -c "import keras; print(keras.__version__)")
    # What cnnkit imports that the device's image lacks (its package list: .library/device/KINDS.md).
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$STAGE" "keras==$keras_version" namex optree simplejpeg sqlalchemy alembic mako greenlet
    archive=../shared/datasets/cifar10-jpg.tar.gz
    [[ -f "$archive" ]] || { echo "error: need $archive (the CIFAR-10 JPEG archive)" >&2; exit 2; }
    cp "$archive" "$STAGE/"
    du -sh "$STAGE"
    echo "prepared $STAGE: now run(command=\"bash bench/gpu.sh\", carry=[\".gpu\"], timeout_s=600)"
    exit 0
fi

which=${1:-all}
case $which in all|tta|backends) ;; *) echo "error: unknown part '$which' (all, tta, backends)" >&2; exit 2;; esac
OUT=${OUT:-/tmp/cnnkit-gpu-out}  # the device tool sets OUT; bench/results/gpu/ holds the JSON either way
mkdir -p "$OUT" bench/results/gpu
if [[ -z "${GPU_SKIP_WHEELS:-}" ]]; then
    ls "$STAGE"/*.whl > /dev/null 2>&1 || { echo "error: no wheels in $STAGE: run 'bash bench/gpu.sh --prepare' here first, then carry .gpu" >&2; exit 2; }
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$STAGE"/*.whl || exit 2
    export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONPATH="${PYTHONPATH:-$PWD}" PYTHONUNBUFFERED=1
if [[ ! -d bench/.data/cifar10-jpg/train ]]; then
    if [[ -f "$STAGE/cifar10-jpg.tar.gz" ]]; then
        mkdir -p bench/.data/cifar10-jpg && tar -xzf "$STAGE/cifar10-jpg.tar.gz" -C bench/.data/cifar10-jpg
    fi  # else bench/_common.py extracts ../shared's archive, or says it needs it
fi
(nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv) 2>&1 | tee "$OUT/gpu.txt"

started=$SECONDS
part() {  # part NAME SECONDS COMMAND...: one bench under a timeout, its log and results copied to $OUT
    local name=$1 limit=$2 begin=$SECONDS status
    shift 2
    timeout -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1
    status=$?
    echo "=== gpu part $name: exit $status$([[ $status == 124 ]] && echo ' (timed out)'), $((SECONDS - begin)) s"
    tail -n 25 "$OUT/$name.log"
    cp bench/results/gpu/*.json bench/results/backends.partial.jsonl "$OUT"/ 2>/dev/null
}
if [[ $which == all || $which == tta ]]; then
    part time_to_accuracy_jax 240 env KERAS_BACKEND=jax "$PYTHON" bench/time_to_accuracy.py \
        --budgets "${GPU_BUDGETS:-1m,2m}" --tutorial-minutes 0 --name gpu/time_to_accuracy_jax
fi
if [[ $which == all || $which == backends ]]; then
    part backends 180 "$PYTHON" bench/backends.py --backends jax,torch --images "${GPU_IMAGES:-5000}" --epochs 3 \
        --name gpu/backends
fi
echo "=== gpu: $((SECONDS - started)) s; in $OUT: $(ls "$OUT" | tr '\n' ' ')"
