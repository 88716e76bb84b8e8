#!/usr/bin/env bash
# Creates or reuses .venv, installs fsmnet-jax with its test and torch extras, runs the tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k model`.
# Test files run in $FSMNET_TEST_WORKERS (default 2) parallel workers: most of the suite's
# time is XLA compilation, which is single-threaded.
set -euo pipefail
cd "$(dirname "$0")/.."
FSMNET_EXTRAS=dev,torch source scripts/setup_env.sh
# Workers on a GPU machine share the device: allocate memory as needed, not 75% each.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
# Files go to the workers in the order tests/conftest.py gives (slowest first), not by test count.
python -m pytest -n "${FSMNET_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
