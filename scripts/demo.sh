#!/usr/bin/env bash
# Creates or reuses .venv, installs fsmnet-jax, and runs the paper-size model on synthetic input.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
python scripts/forward_demo.py "$@"
