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
# glibc's malloc otherwise hands every large array back to the kernel when it is freed and
# page-faults it in again at the next allocation (docs/benchmarks.md): keeping freed memory
# cut the 240 px parity check's system time from 19 to 2.5 s. Arithmetic is unchanged.
keep_freed_memory=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736
export GLIBC_TUNABLES="${GLIBC_TUNABLES:-$keep_freed_memory}"
# The workers share the cores, and PyTorch's OpenMP threads otherwise spin while they wait for
# each other, burning the CPU time the other worker needs: two 240 px parity checks side by side
# took 401 s, 181 s with passive waiting (one alone: 85 s; 2-core Zen 3). Arithmetic is unchanged.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# Files go to the workers in the order tests/conftest.py gives (slowest first), not by test count.
python -m pytest -n "${FSMNET_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
