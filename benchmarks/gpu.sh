#!/usr/bin/env bash
# On a machine with one CUDA GPU, nothing downloaded, random-weight models of real sizes (SmolLM2-135M's
# shape with a chat template, and GPT-2 124M), bf16:
#   check:      each script for a few steps, LoRA with gradient checkpointing, --resume against an uninterrupted
#               run, the --fsdp sharding path (one NCCL rank), the cuDNN case the packed pass avoids (gpu_check.py)
#   generation: the plain decode loop against the static one with a CUDA graph, and a GRPO step with each
#               (gpu_generation.py)
#   bash benchmarks/gpu.sh [check|generation] [--only scoring,grpo,gpt2,ppo,trpo,rm,lora,resume,fsdp,cudnn]
# Each part is meant to finish within 8 minutes on an H200 (not yet timed there: no GPU was lent since they were written).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
part=${1:-all}; [ $# -gt 0 ] && shift
if [ "$part" = all ] || [ "$part" = check ]; then
  rm -rf benchmarks/out/gpu  # a re-run replaces the last one
  python benchmarks/gpu_check.py --out benchmarks/out/gpu "$@"
fi
if [ "$part" = all ] || [ "$part" = generation ]; then
  rm -rf benchmarks/out/generation
  python benchmarks/gpu_generation.py --out benchmarks/out/generation
fi
