#!/usr/bin/env bash
# Creates or reuses .venv, installs fsmnet-jax with its test and torch extras, runs the tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k model`.
set -euo pipefail
cd "$(dirname "$0")/.."
FSMNET_EXTRAS=dev,torch source scripts/setup_env.sh
python -m pytest "$@"
