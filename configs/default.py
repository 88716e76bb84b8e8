"""Every setting, with the paper's FSMNet: BraTS, T1 guiding 4x T2, 240x240, batch 4, 100k steps.

The model section holds `fsmnet_jax.model.FSMNet`'s attributes: `FSMNet(**config.model)`.
Override any field on the command line as `--config.model.num_features=32`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # 'fsmnet', or 'mdunet': the paper's multi-modal U-Net baseline (Table 1 MDUNet, Table 2's
  # first row), built from config.model.num_features alone.
  config.model_name = 'fsmnet'
  config.model = ml_collections.ConfigDict()
  config.model.num_features = 64
  config.model.num_res_blocks = 2
  config.model.num_heads = 8
  config.model.use_frequency_branch = True
  config.model.use_cms_fusion = True
  config.model.use_fs_fusion = True
  config.model.use_spa_att = False  # True fixes the reference's reuse of `fre_att`

  config.data = ml_collections.ConfigDict()
  # 'demo' | 'brats' | 'ixi' | 'nifti_pairs' | 'fastmri' | 'fastmri_multicoil' | 'm4raw' |
  # 'prepared' (shards written by fsmnet-prepare-data)
  config.data.dataset = 'brats'
  config.data.root = ''
  config.data.acceleration = 4
  config.data.image_size = 240
  config.data.mask_type = 'random'  # a fastMRI mask type (whole lines), 'gaussian' or 'poisson' (2-D)
  config.data.mask_axis = 1  # lines at positions along W (1) or H (0)
  config.data.center_fraction = 0.08  # 0.04 at 8x
  config.data.percentile = 99.5  # NIfTI intensity scaling: robust max per volume
  config.data.min_foreground = 0.1  # skip slices with less foreground than this fraction
  config.data.test_fraction = 0.25  # subject-level split 3:1, as the paper
  config.data.skip_bad_subjects = False  # True: log and skip unreadable subjects, else stop
  config.data.split_file = ''  # where to write / read the split ('' = recompute, write nothing)
  config.data.train_pairs = ''  # fastmri, fastmri_multicoil: CSV of PD/PDFS file pairs per split
  config.data.test_pairs = ''
  # ixi, m4raw: the contrast reconstructed and the one guiding it (ixi: 'T2', 'PD' or 'T1'; PD
  # shares T2's acquisition, T1 is aligned to it by the headers. m4raw: 'T1', 'T2' or 'FLAIR').
  config.data.target_contrast = 'T2'
  config.data.reference_contrast = 'PD'
  config.data.sites = ''  # ixi: '' = all, or 'HH', 'Guys,IOP'
  config.data.repetition = 0  # m4raw: the repetition to read (1, 2, ...), 0: their average
  # nifti_pairs: file name patterns of the target and the reference in each subject folder.
  config.data.target_glob = ''  # e.g. '*_t2.nii.gz'
  config.data.reference_glob = ''  # e.g. '*_t1.nii.gz'
  config.data.worker_count = 0  # grain worker processes
  config.data.cache_dir = ''  # decoded NIfTI volumes ('' = $XDG_CACHE_HOME/fsmnet-jax)

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 4  # global: split over all devices of all processes
  config.train.num_steps = 100_000
  config.train.learning_rate = 1e-4
  config.train.schedule = 'reference'  # x0.5 every decay_every steps; 'paper': x0.1; 'constant'
  config.train.decay_every = 20_000
  config.train.clip_norm = 0.01  # global gradient norm, as torch's clip_grad_norm_ (0: off)
  config.train.b1 = 0.9
  config.train.b2 = 0.999
  config.train.weight_decay = 1e-4
  config.train.ema_decay = 0.0  # e.g. 0.999 keeps an EMA of the parameters, used for eval
  config.train.grad_accum_steps = 1  # micro-batches per step (each batch_size / this)
  # 'bfloat16': bf16 convs, fp32 params, loss and FFTs; 'float64' (JAX_ENABLE_X64=1): parity
  config.train.compute_dtype = 'float32'
  config.train.on_nonfinite = 'stop'  # a NaN/inf loss or gradient: 'stop', or 'skip' the update
  config.train.max_consecutive_skips = 10  # 'skip' still stops after this many in a row
  config.train.shard_optimizer_state = False  # FSDP-style: Adam moments split over `data`
  config.train.log_every = 100  # also the stretch over which speed_* (images/s, MFU) is measured
  # MFU's denominator, TFLOP/s per device; 0: looked up by device kind (fsmnet_jax/throughput.py)
  config.train.peak_tflops = 0.0
  # Several processes agree on a SIGTERM/SIGINT (finish the step, save, exit) every this many
  # steps: one allgather there, none on the steps between. One process checks every step.
  config.train.signal_check_every = 10
  config.train.profile_steps = ()  # (first, last): a jax.profiler trace of them in WORKDIR/profile
  config.train.checkpoint_every = 5_000
  config.train.keep_checkpoints = 3  # the latest ones, plus the best by eval PSNR

  config.eval = ml_collections.ConfigDict()
  config.eval.every = 5_000  # steps between evaluations on the test split (and at the end)
  config.eval.batch_size = 4  # global
  # Evaluation during training: the split's first max_batches global batches (0: all of it).
  config.eval.max_batches = 0

  config.mesh = ml_collections.ConfigDict()
  config.mesh.model = 1  # devices per model replica; the rest form the `data` axis
  return config
