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
  config.data.mask_type = 'random'  # a fastMRI mask type (whole lines), 'gaussian' or 'poisson' (2-D)
  config.data.mask_axis = 1  # lines at positions along W (1) or H (0)
  config.data.center_fraction = 0.08  # 0.04 at 8x
  config.data.percentile = 99.5  # BraTS intensity scaling: robust max per volume
  config.data.min_foreground = 0.1  # skip slices with less foreground than this fraction
  config.data.test_fraction = 0.25  # subject-level split 3:1, as the paper
  config.data.skip_bad_subjects = False  # True: log and skip unreadable subjects, else stop
  config.data.split_file = ''  # where to write / read the split ('' = recompute, write nothing)
  config.data.train_pairs = ''  # fastMRI: CSV of PD/PDFS file pairs per split
  config.data.test_pairs = ''
  config.data.worker_count = 0  # grain worker processes
  config.data.cache_dir = ''  # decoded BraTS volumes ('' = $XDG_CACHE_HOME/fsmnet-jax)

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 4
  config.train.num_steps = 100_000
  config.train.learning_rate = 1e-4
  return config
