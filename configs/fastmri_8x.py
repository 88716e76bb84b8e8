"""The paper's fastMRI knee 8x setting: PD guides PDFS undersampled 8x (4% centre), 320x320.

  fsmnet-train --config configs/fastmri_8x.py --workdir runs/fastmri_8x \\
    --config.data.root /data/knee_singlecoil \\
    --config.data.train_pairs singlecoil_train_split_less.csv \\
    --config.data.test_pairs singlecoil_val_split_less.csv
"""

import ml_collections

from fsmnet_jax.configs import fastmri_4x


def get_config() -> ml_collections.ConfigDict:
  config = fastmri_4x.get_config()
  config.data.acceleration = 8
  config.data.center_fraction = 0.04
  return config
