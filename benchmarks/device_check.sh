#!/usr/bin/env bash
# On a machine with a GPU: the GPU tests, then activation collection (tokens/s) and steered
# generation on GPU vs CPU, then exact search of 1M x 1M (d 768, top 10) on the GPU with the
# labelling run's torch path (indexes.torch_search: float16 GEMM, float32 re-score; target <= 60 s),
# checked on 1,024 queries against a float32 GEMM. About 5 minutes; run from the project root:
#     bash benchmarks/device_check.sh
# SEARCH_N=200000 bash benchmarks/device_check.sh   # a smaller search (both sides)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" ATLAS_QUIET=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
SEARCH_N="${SEARCH_N:-1000000}"
python - <<'PY'
import torch
print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}"
      + (f", {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""))
PY
python -m pytest -q -p no:cacheprovider -m gpu -rs tests/models/test_devices.py tests/indexes/test_torch_search.py
python benchmarks/bench_devices.py "$@"
# 1M x 1M exact on the GPU: a warm-up at 100k first (CUDA context, kernels), then the measured run
python benchmarks/bench_exact.py --device cuda --n 100000 --queries 100000 -k 10 --reps 1
python benchmarks/bench_exact.py --device cuda --n "$SEARCH_N" --queries "$SEARCH_N" -k 10 --reps 1 \
    --json "${OUT:-.}/device_exact_1m.json"
