"""The paper's FSMNet: BraTS, T1 guiding 4x-undersampled T2, 240x240, batch 4, 100k steps.

The model section holds `fsmnet_jax.model.FSMNet`'s attributes: `FSMNet(**config.model)`.
Override any field on the command line as `--config.model.num_features=32`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.model = ml_collections.ConfigDict()
  config.model.num_features = 64
  config.model.num_res_blocks = 2
  config.model.num_heads = 8
  config.model.use_frequency_branch = True
  config.model.use_cms_fusion = True
  config.model.use_fs_fusion = True
  config.model.use_spa_att = False  # True fixes the reference's reuse of `fre_att`

  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'brats'  # 'demo' | 'brats' | 'fastmri'
  config.data.root = ''
  config.data.acceleration = 4
  config.data.image_size = 240

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 4
  config.train.num_steps = 100_000
  config.train.learning_rate = 1e-4
  return config
