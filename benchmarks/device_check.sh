#!/usr/bin/env bash
# The prepared call on a lent GPU machine: install the project with the wheels carried in .whl/ (that
# machine reaches no registry: benchmarks/device_wheels.sh fetches them here first), run the CUDA-only
# tests, then the performance suite within BUDGET seconds, leaving every log and the suite's JSON in $OUT
# (which the device tool brings back). About 1-2 minutes before the suite starts.
#
#   bash benchmarks/device_wheels.sh                                   # here, once
#   device run: bash benchmarks/device_check.sh 330   (carry .whl, timeout_s 560)
#   python benchmarks/suite.py --from-json FILES_AT/suite.json --page docs/project/performance.md   # back here
#   OUT=/tmp/rehearsal bash benchmarks/device_check.sh 60 --dry-run    # a rehearsal on any machine
#
# Arguments after BUDGET go to benchmarks/suite.py (--dry-run, --steps N).
set -uo pipefail
cd "$(dirname "$0")/.."
budget=${1:-330}
shift || true
out=${OUT:-out/device}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "error: the carried wheels did not install"; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $py -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1; then
    echo "note: pip install -e . failed (install.log); running from the checkout"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
{
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    $py -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
} 2>&1 | tee "$out/device.txt"
# the tests that need CUDA (skipped on the CPU): per-sample noise on the device, attention on the fused
# kernels, no host synchronisation inside a guided sampling loop or a training step
$py -m pytest -q -p no:cacheprovider -k cuda tests/test_generate.py tests/test_networks.py tests/test_training.py \
    2>&1 | tee "$out/cuda_tests.log"
$py benchmarks/suite.py --budget "$budget" --json "$out/suite.json" "$@" 2>&1 | tee "$out/suite.log"
