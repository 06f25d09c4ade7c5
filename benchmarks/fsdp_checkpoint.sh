#!/usr/bin/env bash
# An --fsdp checkpoint of the embedded SmolLM2-135M under torchrun (2 gloo processes, this CPU): each process
# writing its shards (this code) against everything gathered on rank 0 (the code at OLD, default de57cae, the last
# commit before sharded checkpoints). Machine otherwise idle. Prints each process's JSON lines per checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
old=${OLD:-de57cae}
work=$(mktemp -d)
git worktree add -q "$work/old" "$old"
flags=(--fsdp --steps 3 --save-interval 1 --prompts-per-step 2 --group-size 2 --max-new-tokens 16 --eval-prompts 0)
for code in old new; do
  dir=$([ $code = old ] && echo "$work/old" || pwd)
  batch=$([ $code = old ] && echo --minibatch-size || echo --micro-batch-size)  # renamed since
  echo "== $code ($(git -C "$dir" rev-parse --short HEAD))"
  CHECKPOINT_CODE=$dir OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc-per-node 2 \
    benchmarks/fsdp_checkpoint.py -- "${flags[@]}" "$batch" 2 --output-dir "$work/runs" --run-name $code 2>/dev/null \
    | grep '^{'
  du -sh "$work/runs/$code/checkpoint"
done
git worktree remove --force "$work/old"
rm -rf "$work"
