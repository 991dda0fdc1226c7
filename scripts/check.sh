#!/usr/bin/env bash
# The main job (until the QLoRA fine-tuning demo exists): build peftkern if needed, then check
# every compiled op on every available device against its reference.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m peftkern.check "$@"
