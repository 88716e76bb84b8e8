#!/usr/bin/env bash
# Creates or reuses .venv and installs fsmnet-jax, makes the synthetic demo data (brain anatomy:
# nilearn's ICBM152 template deformed per subject, in the dev extras), trains the demo
# config on it (resuming if a run is there), then evaluates it with fsmnet-eval: Table 1 of
# FSMNet, FSMNet + data consistency and zero-filling, per-slice CSV and pictures, written to
# runs/demo/eval_test. Safe to run again: data and runs are reused; only the evaluation folder
# is rewritten.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
data=demo_data
workdir=runs/demo
[ -d "$data/brats" ] || fsmnet-make-demo-data --anatomy brain "$data"
fsmnet-train --config configs/demo.py --workdir "$workdir" --config.data.root "$data" "$@"
fsmnet-eval --config configs/demo.py --config.data.root "$data" --checkpoint "$workdir" \
  --data_consistency --overwrite
echo "Report: $workdir/eval_test/table1.md; pictures: $workdir/eval_test/panels/*.png and" \
  "$workdir/eval_test/psnr_per_slice.png"
