#!/usr/bin/env bash
# The pure-Python wheels the lent GPU machine lacks (its python3 is 3.12 with torch 2.11 and transformers 5.17, no
# tyro; this project is written for transformers 5.24, whose forward takes `cache` where 5.17's takes
# `past_key_values`), downloaded here into .whl/ (ignored by git) for the device tool to carry: run(carry=[".whl"]).
# 16 MB in all; the device's huggingface-hub 1.33, tokenizers 0.23.2 and safetensors 0.8.0 satisfy transformers 5.24.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for wheel in transformers==5.24.0 peft==0.21.2 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1; do  # the versions requirements.txt installs here
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 -d .whl "$wheel"
done
ls .whl
