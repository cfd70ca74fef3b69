#!/usr/bin/env bash
# The GPU measurements for a lent machine (no network there). Results land in $OUT (the device
# tool brings them back); copy them to benchmarks/results/ and record them in
# benchmarks/RESULTS.md with the card's name.
#
#   OUT=/tmp/out bash benchmarks/device_run.sh card                  # ~4 min
#   OUT=/tmp/out bash benchmarks/device_run.sh blocks [DIR ...]      # ~6 min
#   OUT=/tmp/out bash benchmarks/device_run.sh all [DIR ...]
#   OUT=/tmp/out bash benchmarks/device_run.sh group                 # ~7 min, its own call (not in all)
#   OUT=/tmp/out bash benchmarks/device_run.sh gguf                  # ~5 min, its own call (not in all)
#
# card:   720p on a 24 GB card: the real sampler under a 24 GiB allocator cap, and the time of a
#         whole-expert move, pageable vs pinned (bench_small_card.py).
# blocks: first installs the optional packages found in DIR ... (default .whl): every *.whl with
#         pip (no index, no deps), and split archives NAME.tar.xz.partNN (a package too large to
#         carry in one call, e.g. FlashAttention 4's CuTe DSL compiler; the parts may arrive in
#         different folders over several calls) unpacked into site-packages. Then bench_gpu.py:
#         ours vs diffusers eager, the attention kernels and backends, compile with each exact
#         backend, the non-block work and the VAE decode.
# gguf:   bench_gguf.py on the GPU: every type's dequantisation against gguf's numpy (parity on
#         the CUDA kernels), eager and compiled, and seconds per 720p block in bf16, Q8_0 and Q4_K
#         in the same run.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
phase=${1:-all}
shift || true
dirs=("$@")
[ ${#dirs[@]} -gt 0 ] || dirs=(.whl)

install_packages() {
    local site wheels=() parts=() seen=" " f base
    for f in $(for d in "${dirs[@]}"; do ls "$d"/*.whl "$d"/*.part[0-9][0-9] 2>/dev/null; done); do
        base=$(basename "$f")
        case "$seen" in *" $base "*) continue ;; esac  # the same file carried twice
        seen="$seen$base "
        case "$base" in *.whl) wheels+=("$f") ;; *) parts+=("$base=$f") ;; esac
    done
    if [ ${#wheels[@]} -gt 0 ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "${wheels[@]}" 2>&1 | tail -3
    fi
    site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    for archive in $(printf '%s\n' "${parts[@]}" | sed 's/\.part[0-9]*=.*//' | sort -u); do
        printf '%s\n' "${parts[@]}" | grep "^$archive\.part" | sort | cut -d= -f2- | xargs cat | xz -d \
            | tar -x -C "$site" && echo "# unpacked $archive into $site" || echo "# note: $archive incomplete, skipped"
    done
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/gpu.txt"
if [ "$phase" = card ] || [ "$phase" = all ]; then
    timeout 280 python3 benchmarks/bench_small_card.py --switch-timing --steps 2 --json "$OUT/small_card.json" \
        2>&1 | tee "$OUT/small_card.log"
fi
if [ "$phase" = blocks ] || [ "$phase" = all ]; then
    install_packages 2>&1 | tee "$OUT/install.log"
    python3 -c 'from wan22_core.models.attention import available_backends as a; print("# backends:", a())' \
        2>&1 | tee -a "$OUT/install.log"
    timeout 400 python3 benchmarks/bench_gpu.py --only ours,attention,compile,overhead,vae --budget-s 300 \
        --json "$OUT/gpu.json" --chart "$OUT/gpu.png" 2>&1 | tee "$OUT/gpu.log"
fi
if [ "$phase" = group ]; then
    timeout 590 python3 benchmarks/bench_group.py --json "$OUT/group.json" 2>&1 | tee "$OUT/group.log"
fi
if [ "$phase" = gguf ]; then
    # every type eager (parity + GB/s; compiling all 13 would take minutes), then the two the
    # block section uses compiled, with the 720p blocks
    timeout 150 python3 benchmarks/bench_gguf.py --device cuda --json "$OUT/gguf_gpu_types.json" \
        2>&1 | tee "$OUT/gguf_gpu_types.log"
    timeout 300 python3 benchmarks/bench_gguf.py --device cuda --types Q8_0,Q4_K --compile --block \
        --json "$OUT/gguf_gpu_block.json" 2>&1 | tee "$OUT/gguf_gpu_block.log"
fi
