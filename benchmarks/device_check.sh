#!/usr/bin/env bash
# On a machine with a GPU: the GPU tests, then activation collection (tokens/s) and steered
# generation on GPU vs CPU. Short (a few minutes); run from the project root:
#     bash benchmarks/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" ATLAS_QUIET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
python - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
PY
python -m pytest -q -p no:cacheprovider -m gpu -rs tests/models/test_devices.py
python benchmarks/bench_devices.py "$@"
