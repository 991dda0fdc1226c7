# Sourced by scripts/demo.sh, check.sh and test.sh: a Python environment with everything in
# requirements-dev.txt (and requirements-demo.txt, installed without dependencies), and peftkern
# built in place (rebuilt only when csrc/ or setup.py changed).
#
# Environment: PEFTKERN_VENV (default: the active venv, else ~/.cache/peftkern/venv-<hash of
# requirements-dev.txt>, shared by every clone on the machine), CUDA_HOME, PEFTKERN_CUDA_ARCHS,
# PEFTKERN_FORCE_CPU, MAX_JOBS (see README "Build options").
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
REQUIREMENTS="$ROOT/requirements-dev.txt"
REQUIREMENTS_NO_DEPS="$ROOT/requirements-demo.txt"
REQ_HASH=$(sha256sum "$REQUIREMENTS" | cut -c1-12)

if [[ -n "${PEFTKERN_VENV:-}" ]]; then
  VENV=$PEFTKERN_VENV
elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
  VENV=$VIRTUAL_ENV
else
  VENV="$HOME/.cache/peftkern/venv-$REQ_HASH"
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "peftkern: creating the environment $VENV" >&2
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"
if [[ ! -f "$VENV/.peftkern-requirements-$REQ_HASH" ]]; then
  echo "peftkern: installing requirements-dev.txt (torch is several GB the first time)" >&2
  python -m pip install -q --disable-pip-version-check --upgrade pip
  python -m pip install -q --disable-pip-version-check -r "$REQUIREMENTS"
  touch "$VENV/.peftkern-requirements-$REQ_HASH"
fi
DEMO_HASH=$(sha256sum "$REQUIREMENTS_NO_DEPS" | cut -c1-12)
if [[ ! -f "$VENV/.peftkern-demo-$DEMO_HASH" ]]; then
  python -m pip install -q --disable-pip-version-check --no-deps -r "$REQUIREMENTS_NO_DEPS"
  touch "$VENV/.peftkern-demo-$DEMO_HASH"
fi

# A real toolkit, not the /usr/local/bin/nvcc wrapper that makes torch guess CUDA_HOME=/usr/local.
if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
  export CUDA_HOME=/usr/local/cuda
fi
if command -v ccache >/dev/null 2>&1; then  # torch's build uses ccache when it is on PATH
  # BASEDIR + NOHASHDIR: clones at different paths (CI clones afresh) share cache hits.
  export CCACHE_NOHASHDIR=1 CCACHE_BASEDIR="$ROOT" CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/peftkern/ccache}"
fi

cd "$ROOT"
built=$(ls peftkern/_C*.so 2>/dev/null | head -n 1 || true)
if [[ -z "$built" || -n "$(find csrc setup.py -newer "$built" -print -quit)" ]]; then
  echo "peftkern: building the op library" >&2
  build_start=$(date +%s)
  MAX_JOBS="${MAX_JOBS:-$(nproc)}" python -m pip install -q --disable-pip-version-check \
    --no-build-isolation --no-deps -e .
  echo "peftkern: build took $(( $(date +%s) - build_start )) s" >&2
fi
