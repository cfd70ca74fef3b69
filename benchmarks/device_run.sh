#!/usr/bin/env bash
# The measurements still missing on a lent GPU machine (one call, under 10 minutes; no network
# there). Results land in $OUT (the device tool brings them back); copy them to benchmarks/results/
# and record them in benchmarks/RESULTS.md with the card's name.
#
#   OUT=/tmp/out bash benchmarks/device_run.sh
#
# 1. 720p on a 24 GB card: the real sampler under a 24 GiB allocator cap (bench_small_card.py).
# 2. The block benchmark again on the current model, eager + compile + overhead (bench_gpu.py);
#    diffusers is optional there (carry a wheel folder .whl/ to compare side by side).
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
if [ -d .whl ]; then pip install --quiet --no-index --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; fi
timeout 300 python benchmarks/bench_small_card.py --switch-timing --json "$OUT/small_card.json" 2>&1 | tee "$OUT/small_card.log"
timeout 270 python benchmarks/bench_gpu.py --only ours,compile,overhead --budget-s 180 \
    --json "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.log"
