"""The paper's BraTS 4x setting: T1 guides T2 undersampled 4x (random lines, 8% centre), 240x240.

  fsmnet-train --config configs/brats_4x.py --workdir runs/brats_4x \\
    --config.data.root /data/BraTS2020 --config.data.split_file runs/brats_split.json

The paper decays the learning rate x0.1 every 20k steps, the reference code x0.5; this config
follows the code (`--config.train.schedule=paper` for the paper's).
"""

import ml_collections

from fsmnet_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.dataset = 'brats'
  config.data.acceleration = 4
  config.data.center_fraction = 0.08
  return config
