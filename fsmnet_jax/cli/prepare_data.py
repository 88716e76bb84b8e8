"""fsmnet-prepare-data: a data set's ready slices, both splits, as ArrayRecord shards that
training and evaluation read with config.data.dataset='prepared' (docs/data.md).

  fsmnet-prepare-data --config configs/brats_4x.py --config.data.root /data/BraTS2021 \\
    --out /data/brats_4x-prepared
  fsmnet-train --config configs/brats_4x.py --workdir runs/brats_4x \\
    --config.data.dataset prepared --config.data.root /data/brats_4x-prepared

The shards record the settings that decide the slices (image size, contrasts, ...; not the
masks); a run with other settings is refused, naming them.
"""

import logging

from absl import flags
from ml_collections import config_flags

from fsmnet_jax import files
from fsmnet_jax.cli.common import check_data_settings, run_absl_app
from fsmnet_jax.data import pipeline, shards
from fsmnet_jax.reporting import ProgressBar

config_flags.DEFINE_config_file('config', None, 'A configs/*.py file (its data settings and '
                                'seed decide the slices).', lock_config=True)
flags.DEFINE_string('out', None, 'New (or empty) folder, or gs:// URL, for the shards and '
                    'prepared.json.')
flags.DEFINE_integer('shard_size_mb', shards.SHARD_BYTES // 2**20,
                     'Uncompressed megabytes of slices per shard file.')
flags.DEFINE_bool('overwrite', False, 'Replace an existing --out folder (once the new one is '
                  'complete).')
flags.DEFINE_bool('debug', False, 'Show tracebacks of errors.')
flags.mark_flags_as_required(['config', 'out'])
FLAGS = flags.FLAGS


def _prepare() -> None:
  config, out = FLAGS.config, FLAGS.out
  if FLAGS.shard_size_mb < 1:
    raise ValueError(f'--shard_size_mb={FLAGS.shard_size_mb}: must be at least 1')
  check_data_settings(config)
  bars = {}

  def progress(split: str, done: int, total: int) -> None:
    bar = bars.setdefault(split, ProgressBar(total, unit=f'{split} slice'))
    bar.update(done)
    if done == total:
      bar.close()

  manifest = pipeline.prepare(config, out, FLAGS.shard_size_mb * 2**20, FLAGS.overwrite,
                              progress)
  size = sum(map(files.size_of, files.files_under(files.as_path(out))))
  for split, table in manifest['splits'].items():
    logging.info('%s: %d slices of %d volumes in %d shards', split, table['slices'],
                 len(table['volumes']), len(table['shards']))
  print(f'wrote {out}: {size / 2**20:,.1f} MiB; train with --config.data.dataset prepared '
        f'--config.data.root {out}')


def run() -> None:
  run_absl_app('fsmnet-prepare-data', _prepare, __name__)


if __name__ == '__main__':
  run()
