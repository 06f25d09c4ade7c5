#!/usr/bin/env bash
# DDP against FSDP (--fsdp) under torchrun: seconds per step and peak memory of each process, for
# grpo.py and ppo.py on the embedded SmolLM2-135M-Instruct. Run from the project root, machine idle:
#   bash benchmarks/ddp_vs_fsdp.sh [processes, default 2] > ddp_vs_fsdp.txt
# Two passes. "time": glibc's allocator as it is. "memory": MALLOC_MMAP_THRESHOLD_=65536, which maps
# every block of 64 kB or more on its own and returns it when freed. Without it, glibc keeps the
# blocks FSDP frees after each layer's gather (tens of MB) in its heap, and resident memory, the
# figure on a CPU, goes on counting them; with it, steps are slower (page faults), hence two passes.
# (On a GPU, PyTorch's caching allocator reuses such blocks.)
set -euo pipefail
N=${1:-2}
OUT=$(mktemp -d)
GRPO="--steps 5 --prompts-per-step 4 --group-size 8 --micro-batch-size 8"
PPO="--steps 3 --prompts-per-step 16 --minibatch-size 4"
for pass in time memory; do
  for script in grpo ppo; do
    flags=$([ "$script" = grpo ] && echo "$GRPO" || echo "$PPO")
    for mode in ddp fsdp; do
      echo "== $pass: $script $mode: $flags"
      env $([ "$pass" = memory ] && echo MALLOC_MMAP_THRESHOLD_=65536) \
        torchrun --standalone --nproc-per-node "$N" benchmarks/bench.py "$script" $flags --eval-prompts 0 \
        --save-interval 100000 --output-dir "$OUT" --run-name "${pass}_${script}_$mode" \
        $([ "$mode" = fsdp ] && echo --fsdp) 2>&1 | grep -E "^(rank|wall_s|peak_memory_gb|time/)"
    done
  done
done
rm -rf "$OUT"
