#!/usr/bin/env bash
# The self-check: build peftkern if needed, then check every compiled op on every available
# device against its reference (the first thing to run on a machine with a GPU; CI runs it too).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$PEFTKERN_ROOT"
python -m peftkern.check "$@"
