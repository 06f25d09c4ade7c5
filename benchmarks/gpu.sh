#!/usr/bin/env bash
# The GPU checks, made for the machine they meet (the lent GPU: python3 with torch and transformers, no tyro,
# nothing downloadable; only $OUT comes back, at most 8 files). Random-weight models of real sizes, bf16.
#
#   bash benchmarks/gpu_wheels.sh                 # here, once: the wheels that machine lacks, into .whl/ (not in git)
#   bash benchmarks/gpu.sh preflight              # there: versions, and one line if something is missing
#   bash benchmarks/gpu.sh check:scoring,grpo,gpt2,ppo   check:trpo,rm,lora   check:resume,fsdp,cudnn
#   bash benchmarks/gpu.sh generation:llama135m   generation:gpt2,grpo
#   bash benchmarks/gpu.sh all                    # every part above in turn (longer than one 10-minute call)
#
# Each part runs under an 8-minute timeout, writes <part>.json and <part>.log to $OUT (default benchmarks/out/gpu),
# and a failed part is recorded in summary.txt while the next part runs. Exit status: the number of failed parts.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/out/gpu}
mkdir -p "$out"
work=$(mktemp -d)  # models and run folders: large, not for $OUT
if ls .whl/*.whl >/dev/null 2>&1; then  # the versions this project pins, ahead of the machine's own
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

preflight() {
  python3 - <<'PY'
import importlib.metadata as md, importlib.util, sys
need = ["torch", "transformers", "tyro", "safetensors", "tensorboard", "peft", "tqdm", "accelerate"]
versions = {n: (md.version(n) if importlib.util.find_spec(n) else None) for n in need}
print("python", sys.version.split()[0], " ".join(f"{n} {v}" for n, v in versions.items() if v))
missing = [n for n, v in versions.items() if v is None]
if missing:
    sys.exit(f"preflight: missing {', '.join(missing)}: run `bash benchmarks/gpu_wheels.sh` where pip works and carry .whl")
if versions["transformers"] != "5.24.0":
    sys.exit(f"preflight: transformers {versions['transformers']}; this project is written for 5.24.0 (requirements.txt): "
             "run `bash benchmarks/gpu_wheels.sh` where pip works and carry .whl")
import torch
if not torch.cuda.is_available():
    sys.exit("preflight: torch sees no CUDA GPU")
print(torch.cuda.get_device_name(), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
PY
}

failed=0
run_part() {  # run_part NAME COMMAND...: 8 minutes at most, output to $out/NAME.log, status to summary.txt
  local name=$1; shift
  local start=$SECONDS
  timeout 480 "$@" >"$out/$name.log" 2>&1
  local status=$?
  echo "$name: $([ $status = 0 ] && echo passed || echo "FAILED (exit $status$([ $status = 124 ] && echo ', timed out'))") in $((SECONDS - start)) s" | tee -a "$out/summary.txt"
  tail -n 3 "$out/$name.log"
  [ $status = 0 ] || failed=$((failed + 1))
}

preflight || exit 2
for part in "${@:-all}"; do
  case $part in
    preflight) ;;
    check:*) only=${part#check:}
             run_part "check_${only//,/_}" python3 benchmarks/gpu_check.py --out "$work/check" --only "$only" \
                      --json "$out/check_${only//,/_}.json" ;;
    generation:*) only=${part#generation:}
             run_part "generation_${only//,/_}" python3 benchmarks/gpu_generation.py --out "$work/generation" \
                      --only "$only" --json "$out/generation_${only//,/_}.json" ;;
    all) exec bash "$0" check:scoring,grpo,gpt2,ppo check:trpo,rm,lora check:resume,fsdp,cudnn \
                        generation:llama135m generation:gpt2,grpo ;;
    *) echo "unknown part $part: preflight, check:<parts>, generation:<parts> or all"; exit 2 ;;
  esac
done
rm -rf "$work"
exit $failed
