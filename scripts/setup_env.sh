#!/usr/bin/env bash
# Sourced by demo.sh and test.sh: creates or reuses .venv and installs fsmnet-jax into it with
# the extras named in $FSMNET_EXTRAS. Re-installs only when pyproject.toml, this file or the
# extras change.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x .venv/bin/python ]; then
  python_bin=""
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1 \
        && "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
      python_bin=$candidate
      break
    fi
  done
  if [ -z "$python_bin" ]; then
    echo "error: fsmnet-jax needs Python >= 3.10 (3.11 recommended); none found on PATH." >&2
    exit 1
  fi
  echo "Creating .venv with $($python_bin --version)"
  "$python_bin" -m venv .venv
fi

extras=${FSMNET_EXTRAS:-dev}
has_gpu=false
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && has_gpu=true
$has_gpu && extras="$extras,cuda"
stamp=.venv/.fsmnet-installed
want="$(cat pyproject.toml scripts/setup_env.sh | cksum) extras=$extras gpu=$has_gpu"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  if [[ ",$extras," == *",torch,"* ]] && ! $has_gpu; then
    # Unpinned torch resolves to a multi-GB CUDA build; the CPU build is all tests need.
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
  fi
  .venv/bin/python -m pip install --quiet -e ".[$extras]"
  if [[ ",$extras," == *",dev,"* ]]; then
    # The tests compare our masks with fastMRI's; its declared dependencies would pull a CUDA
    # torch and torchvision, and its mask and FFT modules need only numpy and torch.
    .venv/bin/python -m pip install --quiet --no-deps "fastmri==0.3.0"
  fi
  printf '%s' "$want" > "$stamp"
fi
export PATH="$PWD/.venv/bin:$PATH"
