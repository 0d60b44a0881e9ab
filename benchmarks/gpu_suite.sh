#!/usr/bin/env bash
# Fill the README's performance table on one GPU: ImageNet-64 and ImageNet-256 training (images/s,
# peak memory), the digits model's training steps/s, ImageNet-64 and -256 reverse steps guided and
# unguided, and a whole 250-step guided ImageNet-64 run, each with the standard switches (all off)
# and with the fastest settings (bf16, channels-last, torch.compile), printed as one Markdown table.
# Meant to finish in under 8 minutes (--budget, default 450 s, leaves out rows that would start later).
#
#   bash benchmarks/gpu_suite.sh                  # needs a CUDA device
#   bash benchmarks/gpu_suite.sh --dry-run        # any machine: tiny stand-ins, one step (tests/test_speed.py)
#   PYTHON=.venv/bin/python bash benchmarks/gpu_suite.sh --budget 900 --steps 20
#
# The measurements are benchmarks/train_speed.py and benchmarks/sample_speed.py (benchmarks/suite.py
# runs them in one process); random weights, no data needed.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" benchmarks/suite.py "$@"
