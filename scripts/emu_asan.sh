#!/usr/bin/env bash
# The emulated CUDA kernels under AddressSanitizer + UBSan: builds the "asan" variant of the
# emulation (build/emu/asan/) and runs the emulated op tests with libasan preloaded. An
# out-of-bounds global or shared-memory access, or a misaligned vector access, stops with a report.
# Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$PEFTKERN_ROOT"
python -c "from peftkern import emulation; emulation.build('asan')"
modules=$(python -c "
import sys; sys.path.insert(0, '.')
from tests.conftest import EMULATED_MODULES
print(' '.join(f'tests/{m}.py' for m in sorted(EMULATED_MODULES)))")
eval "$(python -c "
from peftkern import emulation
for k, v in emulation.asan_environment().items(): print(f'export {k}=\"{v}\"')")"
PEFTKERN_EMULATION_VARIANT=asan python -m pytest -q -p no:cacheprovider -k "cuda-emulated or test_emulation" \
  $modules tests/test_emulation.py "$@"
