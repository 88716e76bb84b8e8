#!/usr/bin/env bash
# Creates or reuses .venv and installs fsmnet-jax, makes the synthetic demo data, trains the demo
# config on it (resuming if a run is there), and reports PSNR/SSIM of FSMNet next to
# zero-filling. Safe to run again: existing data and runs are reused, never overwritten.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
data=demo_data
workdir=runs/demo
[ -d "$data/brats" ] || fsmnet-make-demo-data "$data"
fsmnet-train --config configs/demo.py --workdir "$workdir" --config.data.root "$data" "$@"
python scripts/demo_report.py "$workdir"
