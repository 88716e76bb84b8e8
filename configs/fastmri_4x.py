"""The paper's fastMRI knee 4x setting: PD guides PDFS undersampled 4x (8% centre), 320x320.

  fsmnet-train --config configs/fastmri_4x.py --workdir runs/fastmri_4x \\
    --config.data.root /data/knee_singlecoil \\
    --config.data.train_pairs singlecoil_train_split_less.csv \\
    --config.data.test_pairs singlecoil_val_split_less.csv

The pairs CSVs are the reference's (`data_split/` in qic999/FSMNet): PD file, PDFS file, score.
"""

import ml_collections

from fsmnet_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.dataset = 'fastmri'
  config.data.image_size = 320
  config.data.acceleration = 4
  config.data.center_fraction = 0.08
  return config
