#!/usr/bin/env bash
# The GPU check of BENCHMARKS.md (see pipelines/gpu_check.py): on one H100/H200, within 10 minutes,
#   bash pipelines/gpu_check.sh --reference_repo PixelREPA --output_dir gpu_check
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m pipelines.gpu_check "$@"
