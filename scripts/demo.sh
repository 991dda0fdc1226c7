#!/usr/bin/env bash
# The main job: QLoRA fine-tuning of SmolLM2-135M with peftkern, then the same with PEFT +
# bitsandbytes for comparison (python -m peftkern.demo --help for options).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$PEFTKERN_ROOT"
python -m peftkern.demo "$@"
