#!/usr/bin/env bash
# grpo.py against Hugging Face TRL's GRPOTrainer, side by side, on this machine, same settings:
# SmolLM2-135M-Instruct, 4 prompts × 4 completions per step, 32 new tokens, β = 0.04, μ = 1, fp32.
# TRL goes into its own virtual environment (benchmarks/out/trl-venv), never into the project's.
#   bash benchmarks/vs_trl.sh [steps] [--gradient-checkpointing]   (the flag goes to both sides)
set -euo pipefail
cd "$(dirname "$0")/.."
steps=${1:-6}
venv=benchmarks/out/trl-venv
if [ ! -x "$venv/bin/python" ]; then
  python -m venv --system-site-packages "$venv"  # reuses the installed torch and transformers
  "$venv/bin/pip" install -q trl==1.16.0
fi
echo "TRL $("$venv/bin/python" -c 'import trl; print(trl.__version__)'), $(nproc) cores, torch threads $(python -c 'import torch; print(torch.get_num_threads())')"
"$venv/bin/python" benchmarks/trl_grpo_step.py "$steps" "${@:2}" 2>/dev/null | tail -1 > benchmarks/out/trl.json
rm -rf benchmarks/out/runs/vs_trl  # a re-run replaces the last one
python benchmarks/bench.py grpo --prompts-per-step 4 --group-size 4 --max-new-tokens 32 --beta 0.04 \
  --num-iterations 1 --micro-batch-size 16 --steps "$steps" --eval-prompts 0 --save-interval 100000 \
  --output-dir benchmarks/out/runs --run-name vs_trl "${@:2}" 2>/dev/null | tee benchmarks/out/ours.txt
python - <<'PY'
import json, re
trl = json.load(open("benchmarks/out/trl.json"))
ours = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in open("benchmarks/out/ours.txt") if "  " in line)
gen, upd = float(ours["time/generation_s (median)"]), float(ours["time/update_s (median)"])
peak = float(ours["peak_memory_gb"])
print(f"TRL GRPOTrainer: {trl['trl_step_s']:.2f} s/step, peak {trl['trl_peak_gb']:.2f} GB")
print(f"grpo.py:         {gen + upd:.2f} s/step (generation {gen:.2f}, update {upd:.2f}), peak {peak:.2f} GB")
print(f"ratio (grpo.py / TRL): time {(gen + upd) / trl['trl_step_s']:.2f}, peak memory {peak / trl['trl_peak_gb']:.3f}")
PY
