#!/usr/bin/env bash
# The compile issue's device check, one run of at most ~10 minutes on a CUDA machine: eager vs CUDA-graph
# replay (compile mode reduce-overhead) at batch 1 and 8 for the default and medium policies, then the
# CUDA 2:4 semi-structured path of benchmarks/compress_lm.py (dense vs 2:4 in bf16), then the weight-only
# int8 and int4 (tinygemm) paths on the large model and the int4 CUDA test, where pytest is installed. JSON under $OUT
# (default: gpu-results). Run from the repository root with a CUDA torch; where the machine's transformers
# is older than the 5.24 we need, carry a wheel of it on PYTHONPATH first (the device tool's README).
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}src PYTHONUNBUFFERED=1
status=0
for model in default medium; do
  for batch in 1 8; do
    timeout 200 python3 -m vlaopt.cli bench --model "$model" --device cuda --batch "$batch" --repeats 20 \
      --recipes configs/bench/cuda_graphs.yaml --out "$out" --json "bench_${model}_batch${batch}.json" || status=1
  done
done
timeout 150 python3 benchmarks/compress_lm.py --device cuda --size small --only 2:4 --repeats 10 \
  --out "$out/compress_lm_cuda.json" || status=1
timeout 150 python3 benchmarks/compress_lm.py --device cuda --size large --only "weight-only" --repeats 10 \
  --out "$out/compress_lm_cuda_weight_only.json" || status=1
if python3 -c "import pytest" 2>/dev/null; then
  timeout 60 python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_int4.py -k cuda || status=1
fi
exit $status
