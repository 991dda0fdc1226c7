# Sourced by scripts/demo.sh, check.sh and test.sh (and by you: `source scripts/env.sh`): a Python
# environment with everything in requirements-dev.txt (and requirements-demo.txt, installed without
# dependencies), activated, and peftkern built in place (rebuilt only when csrc/ or setup.py changed).
#
# Safe to source from an interactive shell: the work runs in subshells with `set -euo pipefail`
# (each step fails fast), so your shell's options and current directory stay as they were and a
# failure returns non-zero instead of closing your shell. What changes in your shell: the venv is
# activated, CUDA_HOME / CCACHE_* are exported when found, and PEFTKERN_ROOT is set. The scripts
# that source it set -euo pipefail themselves, so a failure here stops them.
#
# Environment: PEFTKERN_VENV (default: the active venv, else ~/.cache/peftkern/venv-<hash of
# requirements-dev.txt>, shared by every clone on the machine), CUDA_HOME, PEFTKERN_CUDA_ARCHS,
# PEFTKERN_FORCE_CPU, MAX_JOBS (see README "Environment variables").

# The venv path (stdout): PEFTKERN_VENV, else the active venv, else one per requirements hash.
_peftkern_venv_path() (
  set -euo pipefail
  if [[ -n "${PEFTKERN_VENV:-}" ]]; then
    echo "$PEFTKERN_VENV"
  elif [[ -n "${VIRTUAL_ENV:-}" ]]; then
    echo "$VIRTUAL_ENV"
  else
    req_hash=$(sha256sum "$1/requirements-dev.txt" | cut -c1-12)
    echo "$HOME/.cache/peftkern/venv-$req_hash"
  fi
)

# Create the venv if needed and install the requirements (once per requirements hash).
_peftkern_install() (
  set -euo pipefail
  root=$1 venv=$2
  requirements="$root/requirements-dev.txt"
  requirements_no_deps="$root/requirements-demo.txt"
  req_hash=$(sha256sum "$requirements" | cut -c1-12)
  if [[ ! -x "$venv/bin/python" ]]; then
    echo "peftkern: creating the environment $venv" >&2
    python3 -m venv "$venv"
  fi
  # shellcheck disable=SC1091
  source "$venv/bin/activate"
  if [[ ! -f "$venv/.peftkern-requirements-$req_hash" ]]; then
    echo "peftkern: installing requirements-dev.txt (torch is several GB the first time)" >&2
    python -m pip install -q --disable-pip-version-check --upgrade pip
    python -m pip install -q --disable-pip-version-check -r "$requirements"
    touch "$venv/.peftkern-requirements-$req_hash"
  fi
  demo_hash=$(sha256sum "$requirements_no_deps" | cut -c1-12)
  if [[ ! -f "$venv/.peftkern-demo-$demo_hash" ]]; then
    python -m pip install -q --disable-pip-version-check --no-deps -r "$requirements_no_deps"
    touch "$venv/.peftkern-demo-$demo_hash"
  fi
)

# Build the op library in place when there is none or csrc/ or setup.py is newer (in the
# activated venv).
_peftkern_build() (
  set -euo pipefail
  cd "$1"
  built=$(ls peftkern/_C*.so 2>/dev/null | head -n 1 || true)
  if [[ -z "$built" || -n "$(find csrc setup.py -newer "$built" -print -quit)" ]]; then
    echo "peftkern: building the op library" >&2
    build_start=$(date +%s)
    MAX_JOBS="${MAX_JOBS:-$(nproc)}" python -m pip install -q --disable-pip-version-check \
      --no-build-isolation --no-deps -e .
    echo "peftkern: build took $(( $(date +%s) - build_start )) s" >&2
  fi
)

# Each step is a plain command (never part of `a || b` or `if a`, where bash would ignore set -e
# inside it): in a fail-fast script a failing step stops the script with its status; in an
# interactive shell the status is kept and returned.
PEFTKERN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
_peftkern_venv=$(_peftkern_venv_path "$PEFTKERN_ROOT")
_peftkern_status=$?
if [[ $_peftkern_status -eq 0 ]]; then
  _peftkern_install "$PEFTKERN_ROOT" "$_peftkern_venv"
  _peftkern_status=$?
fi
if [[ $_peftkern_status -eq 0 ]]; then
  # shellcheck disable=SC1091
  source "$_peftkern_venv/bin/activate"
  # A real toolkit, not the /usr/local/bin/nvcc wrapper that makes torch guess CUDA_HOME=/usr/local.
  if [[ -z "${CUDA_HOME:-}" && -x /usr/local/cuda/bin/nvcc ]]; then
    export CUDA_HOME=/usr/local/cuda
  fi
  if command -v ccache >/dev/null 2>&1; then  # torch's build uses ccache when it is on PATH
    # BASEDIR + NOHASHDIR: clones at different paths (CI clones afresh) share cache hits.
    export CCACHE_NOHASHDIR=1 CCACHE_BASEDIR="$PEFTKERN_ROOT" CCACHE_DIR="${CCACHE_DIR:-$HOME/.cache/peftkern/ccache}"
  fi
  _peftkern_build "$PEFTKERN_ROOT"
  _peftkern_status=$?
fi
unset -f _peftkern_venv_path _peftkern_install _peftkern_build
unset _peftkern_venv
if [[ $_peftkern_status -ne 0 ]]; then
  echo "peftkern: scripts/env.sh failed (status $_peftkern_status)" >&2
fi
# The status as a literal, so the variable can go first: `return` when sourced, `exit` when run
# as a script (bash scripts/env.sh).
eval "unset _peftkern_status; return $_peftkern_status 2>/dev/null || exit $_peftkern_status"
