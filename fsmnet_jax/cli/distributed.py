"""The multi-host flags of fsmnet-train and fsmnet-eval, and joining the other processes.

`--distributed` (SLURM, TPU VMs, GKE and other environments jax detects), or
`--coordinator_address host:port --num_processes N --process_id I` given explicitly.
"""

import logging
import os
from typing import Mapping

from absl import flags
import jax

flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() with the '
                  'environment jax detects (SLURM, TPU VM, GKE, ...).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0 (multi-host).')
flags.DEFINE_integer('num_processes', None, 'Number of processes (multi-host).')
flags.DEFINE_integer('process_id', None, 'This process, 0 .. num_processes - 1 (multi-host).')
FLAGS = flags.FLAGS


def is_multi_host(environ: Mapping[str, str] = os.environ) -> bool:
  """Whether this process is one of several: named by the flags, or one task of several that
  SLURM's srun started (SLURM_PROCID; in an allocation alone, SLURM_NTASKS > 1 is no sign)."""
  srun_tasks = int(environ.get('SLURM_NTASKS', '1')) if 'SLURM_PROCID' in environ else 1
  return FLAGS.coordinator_address is not None or FLAGS.distributed or srun_tasks > 1


def initialize() -> None:
  """Joins the other processes of a multi-host run, if this is one."""
  if not is_multi_host():
    return
  explicit = FLAGS.coordinator_address is not None
  # CPU devices exchange data through gloo; GPUs and TPUs ignore this setting.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if explicit:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  else:
    jax.distributed.initialize()
  logging.info('process %d of %d; %d local and %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
