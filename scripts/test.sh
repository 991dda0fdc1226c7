#!/usr/bin/env bash
# The test suite: build peftkern if needed, then pytest (extra arguments go to pytest).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$PEFTKERN_ROOT"
python -m pytest "$@"
