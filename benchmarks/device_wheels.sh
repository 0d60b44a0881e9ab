#!/usr/bin/env bash
# The wheels of the Python packages that a lent GPU machine's image lacks (the device tool's KINDS.md lists
# what it holds: torch, accelerate, numpy, scipy, scikit-learn, matplotlib, tqdm, tensorboard, safetensors,
# huggingface-hub, ... but not omegaconf, diffusers or torch-fidelity), downloaded here into .whl/ (ignored by
# git) for benchmarks/device_check.sh: that machine reaches no package registry. Python 3.12, x86-64.
#
#   bash benchmarks/device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    omegaconf==2.4.0 diffusers==0.42.1 torch-fidelity==0.4.0 importlib_metadata==10.2.0 lazy-importer==0.1.0
ls .whl
