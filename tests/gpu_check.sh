#!/usr/bin/env bash
# The GPU checks in one run, on a machine with a CUDA device, torch, transformers and pytest (nothing is downloaded),
# from the repository root:
#
#   OUT=/some/folder bash tests/gpu_check.sh   # logs and bench_cuda.txt go to $OUT (default: figures/)
#
# 1. tests/test_cuda.py (the decode steps as CUDA graphs against the plain path, sampling, training, the two
#    commands), at most 3 minutes;
# 2. python3 bench.py --device cuda (the GPU table: decode at the 1B shape and the 8B preset, the text-only answer,
#    seconds per image, VQGAN decode, training), at most 5 minutes, saved as $OUT/bench_cuda.txt.
# The bench runs whatever the tests say; the exit code is non-zero if either failed.
set -u
OUT=${OUT:-figures}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
timeout 180 python3 -m pytest -m cuda tests/test_cuda.py -q -rA 2>&1 | tee "$OUT/test_cuda.txt"
tests_rc=${PIPESTATUS[0]}
timeout 300 python3 bench.py --device cuda 2>&1 | tee "$OUT/bench_cuda.txt"
bench_rc=${PIPESTATUS[0]}
echo "test_cuda exit $tests_rc, bench exit $bench_rc (124: ran out of time)" | tee -a "$OUT/gpu.txt"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
