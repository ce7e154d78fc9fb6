#!/usr/bin/env bash
# GPU checks on a machine with CUDA (docs/benchmarks.md, "On a GPU"): bench/device_check.py
# (GPU against CPU), then the tiny-model tests with the models on CUDA.  The real-model tests
# are left out (the bundled Gemma does not travel to such a machine).  Packages the machine's
# image lacks come as wheels in .gpu/whl, the Wikipedia paragraphs under .gpu/site; output
# goes under $OUT.
set -u
OUT=${OUT:-$(mktemp -d)}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD/.gpu/site:$PWD" PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python3 -c 'import sys, torch, transformers; print(sys.version.split()[0], torch.__version__, transformers.__version__)'
} 2>&1 | tee "$OUT/machine.txt"
timeout 90 python3 bench/device_check.py --out "$OUT/device_check.json" 2>&1 \
    | grep -v "covariance:" | tee "$OUT/device_check.log"
tests() {  # name, seconds, files...
    local name=$1 limit=$2; shift 2
    FACTPATCH_TEST_DEVICE=cuda timeout "$limit" python3 -m pytest -p no:cacheprovider -q -rfE \
        --durations=5 -m "not real_model" -k "not tritonclient" --junitxml="$OUT/$name.xml" \
        "$@" 2>&1 | tee "$OUT/$name.log" | tail -40
}
tests core 170 tests/test_editing.py tests/test_memit.py tests/test_tracing.py \
    tests/test_runtime.py tests/test_covariance.py tests/test_models.py tests/test_prompts.py \
    tests/test_cli.py
tests service 200 tests/test_service.py tests/test_processes.py
