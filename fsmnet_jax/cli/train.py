"""fsmnet-train: trains FSMNet from a config file, resuming from the workdir's checkpoint.

  fsmnet-train --config configs/brats_4x.py --workdir runs/brats_4x \\
    --config.data.root /data/BraTS2020 [--config.key=value ...]

Multi-host: `--distributed` (SLURM, TPU VMs, GKE and other environments jax detects), or
`--coordinator_address host:port --num_processes N --process_id I` given explicitly.
"""

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
import jax
from ml_collections import config_flags

from fsmnet_jax import train
from fsmnet_jax.cli.common import check_data_settings, run_absl_app, run_reporting_errors
from fsmnet_jax.orbax_logs import quiet_orbax_logs

config_flags.DEFINE_config_file('config', None, 'A configs/*.py file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and the resolved config go here.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() with the '
                  'environment jax detects (SLURM, TPU VM, GKE, ...).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1 (multi-host).')
flags.DEFINE_bool('debug', False, 'Show tracebacks of errors, orbax\'s included.')
flags.mark_flags_as_required(['config', 'workdir'])
FLAGS = flags.FLAGS


def initialize_distributed() -> None:
  """Joins the other processes of a multi-host run, if this is one."""
  explicit = FLAGS.coordinator_address is not None
  slurm_tasks = int(os.environ.get('SLURM_NTASKS', '1'))
  if not (explicit or FLAGS.distributed or slurm_tasks > 1):
    return
  # CPU devices exchange gradients through gloo; GPUs and TPUs ignore this setting.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if explicit:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  else:
    jax.distributed.initialize()
  logging.info('process %d of %d; %d local and %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  absl_logging.set_verbosity(absl_logging.INFO)
  quiet_orbax_logs(show_tracebacks=FLAGS.debug)
  initialize_distributed()
  sys.exit(run_reporting_errors('fsmnet-train', _train, FLAGS.debug))


def _train() -> None:
  check_data_settings(FLAGS.config)
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run() -> None:
  run_absl_app(main, __name__)


if __name__ == '__main__':
  run()
