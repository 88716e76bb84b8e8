"""A small FSMNet on the synthetic demo data (64x64, 4x): minutes on a laptop CPU.

  fsmnet-make-demo-data demo_data
  fsmnet-train --config configs/demo.py --workdir runs/demo --config.data.root demo_data
"""

import ml_collections

from fsmnet_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.num_features = 16
  config.model.num_res_blocks = 1
  config.model.num_heads = 2
  config.data.dataset = 'demo'
  config.data.image_size = 64
  config.train.batch_size = 4
  config.train.num_steps = 400
  config.train.learning_rate = 1e-3
  config.train.clip_norm = 0.0
  config.train.log_every = 50
  config.train.checkpoint_every = 200
  config.eval.every = 200
  config.eval.batch_size = 8
  return config
