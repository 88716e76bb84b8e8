"""M4Raw low-field brain, 4x: T1 guides T2, both the average of their repetitions' multi-coil
k-space; each coil undersampled with one mask, combined by root-sum-of-squares; 256x256.

  fsmnet-train --config configs/m4raw_4x.py --workdir runs/m4raw_4x --config.data.root /data/M4Raw

The root holds the download's multicoil_train (training) and multicoil_val (the test split).
Not in the paper; its recipe otherwise (batch 4, AdamW lr 1e-4, 100k steps).
"""

import ml_collections

from fsmnet_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.dataset = 'm4raw'
  config.data.target_contrast = 'T2'
  config.data.reference_contrast = 'T1'
  config.data.repetition = 0
  config.data.image_size = 256
  config.data.acceleration = 4
  config.data.center_fraction = 0.08
  return config
