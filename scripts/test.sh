#!/usr/bin/env bash
# The test suite: build peftkern if needed, then pytest (extra arguments go to pytest).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
python -m pytest "$@"
