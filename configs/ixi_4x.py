"""IXI brain, 4x: PD guides T2 (the two echoes of one scan), 256x256, random lines, 8% centre.

  fsmnet-train --config configs/ixi_4x.py --workdir runs/ixi_4x \\
    --config.data.root /data/IXI --config.data.split_file runs/ixi_split.json

T1 as the guide instead: --config.data.reference_contrast=T1 (aligned to the T2 grid by the
headers). Not in the paper; its recipe otherwise (batch 4, AdamW lr 1e-4, 100k steps).
"""

import ml_collections

from fsmnet_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.data.dataset = 'ixi'
  config.data.target_contrast = 'T2'
  config.data.reference_contrast = 'PD'
  config.data.image_size = 256
  config.data.acceleration = 4
  config.data.center_fraction = 0.08
  return config
