"""fsmnet-train: trains FSMNet from a config file, resuming from the workdir's checkpoint.

  fsmnet-train --config configs/brats_4x.py --workdir runs/brats_4x \\
    --config.data.root /data/BraTS2020/MICCAI_BraTS2020_TrainingData [--config.key=value ...]

Multi-host: `--distributed`, or `--coordinator_address host:port --num_processes N
--process_id I` (fsmnet_jax/cli/distributed.py).
"""

from absl import flags
from ml_collections import config_flags

from fsmnet_jax import train
from fsmnet_jax.cli import distributed
from fsmnet_jax.cli.common import check_data_settings, run_absl_app
from fsmnet_jax.orbax_logs import quiet_orbax_logs

config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and the resolved config go here.')
flags.DEFINE_bool('debug', False, 'Show tracebacks of errors, orbax\'s included.')
flags.adopt_module_key_flags(distributed)
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def _setup() -> None:
  quiet_orbax_logs(show_tracebacks=FLAGS.debug)
  distributed.initialize()


def _train() -> None:
  check_data_settings(FLAGS.config)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run() -> None:
  run_absl_app('fsmnet-train', _train, __name__, _setup)


if __name__ == '__main__':
  run()
