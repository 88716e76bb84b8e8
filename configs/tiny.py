"""A few-feature FSMNet on 32x32 images, for tests and smoke runs (seconds on a laptop CPU)."""

import ml_collections

from fsmnet_jax.configs import default


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.model.num_features = 8
  config.model.num_res_blocks = 1
  config.model.num_heads = 2
  config.data.dataset = 'demo'
  config.data.image_size = 32
  config.train.batch_size = 2
  config.train.num_steps = 20
  return config
