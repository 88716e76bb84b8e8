"""The paper's BraTS 8x setting: T1 guides T2 undersampled 8x (random lines, 4% centre), 240x240.

  fsmnet-train --config configs/brats_8x.py --workdir runs/brats_8x \\
    --config.data.root /data/BraTS2020 --config.data.split_file runs/brats_split.json
"""

import ml_collections

from fsmnet_jax.configs import brats_4x


def get_config() -> ml_collections.ConfigDict:
  config = brats_4x.get_config()
  config.data.acceleration = 8
  config.data.center_fraction = 0.04
  return config
