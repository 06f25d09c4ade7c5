#!/usr/bin/env bash
# On a machine with one CUDA GPU, in about 5 minutes, nothing downloaded: each script for a few steps in
# bf16 on random-weight models of real sizes (SmolLM2-135M's shape with a chat template, and GPT-2 124M),
# the checks that can be made there, and tokens/s and peak GPU memory per script. See gpu_check.py.
#   bash benchmarks/gpu.sh [--only scoring,grpo,gpt2,ppo,trpo,rm]
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
rm -rf benchmarks/out/gpu  # a re-run replaces the last one
python benchmarks/gpu_check.py --out benchmarks/out/gpu "$@"
