#!/usr/bin/env bash
# On a machine with one CUDA GPU, in well under 5 minutes: grpo.py trains a GPT-2-sized model
# (GPT2Config(), random weights, a byte-level tokenizer: nothing is downloaded) on CUDA with bf16
# autocast, and prints generated tokens per second, update tokens per second and peak GPU memory.
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python - <<'PY'
import sys
sys.path.insert(0, "tests")
from tiny import byte_tokenizer
from transformers import GPT2Config, GPT2LMHeadModel
tokenizer = byte_tokenizer(chat=False)
config = GPT2Config(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)  # 124 M parameters
GPT2LMHeadModel(config).save_pretrained("benchmarks/out/gpt2-random")
tokenizer.save_pretrained("benchmarks/out/gpt2-random")
PY
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
rm -rf benchmarks/out/runs/gpu  # a re-run replaces the last one
python benchmarks/bench.py grpo --model benchmarks/out/gpt2-random --task letter --steps 10 --prompts-per-step 16 \
  --group-size 8 --max-new-tokens 128 --minibatch-size 32 --device cuda --dtype auto --eval-prompts 0 \
  --save-interval 100000 --output-dir benchmarks/out/runs --run-name gpu "$@"
