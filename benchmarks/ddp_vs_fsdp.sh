#!/usr/bin/env bash
# DDP against FSDP (--fsdp) under torchrun: seconds per step and peak memory of each process, for
# grpo.py and ppo.py on the embedded SmolLM2-135M-Instruct. Run from the project root, machine idle:
#   bash benchmarks/ddp_vs_fsdp.sh [processes, default 2] > ddp_vs_fsdp.txt
set -euo pipefail
N=${1:-2}
OUT=$(mktemp -d)
GRPO="--steps 5 --prompts-per-step 4 --group-size 8 --minibatch-size 8"
PPO="--steps 3 --prompts-per-step 16 --num-minibatches 4"
for script in grpo ppo; do
  flags=$([ "$script" = grpo ] && echo "$GRPO" || echo "$PPO")
  for mode in ddp fsdp; do
    echo "== $script $mode: $flags"
    torchrun --standalone --nproc-per-node "$N" benchmarks/bench.py "$script" $flags --eval-prompts 0 \
      --save-interval 100000 --output-dir "$OUT" --run-name "${script}_$mode" $([ "$mode" = fsdp ] && echo --fsdp) \
      2>&1 | grep -E "^(rank|wall_s|peak_memory_gb|time/)"
  done
done
rm -rf "$OUT"
