"""fsmnet-eval: FSMNet and zero-filling on a data split, in the paper's Table 1 form, with
per-slice CSV, pictures and both metric conventions.

  fsmnet-eval --config configs/brats_4x.py --checkpoint runs/brats_4x \\
    --config.data.root /data/BraTS2020/MICCAI_BraTS2020_TrainingData \\
    [--split test] [--out DIR] [--data_consistency]

Multi-host: `--distributed`, or `--coordinator_address host:port --num_processes N
--process_id I` (fsmnet_jax/cli/distributed.py): each process scores its share of the volumes,
process 0 writes the report.

--checkpoint takes a training workdir (its latest step), a step folder, an exported variables
folder, or a reference PyTorch .pth/.pt/.safetensors (converted on the fly; needs torch).
"""

import logging

from absl import flags
import jax
from ml_collections import config_flags

from fsmnet_jax import evaluate, inference
from fsmnet_jax.cli import distributed
from fsmnet_jax.cli.common import PRECISION_HELP, load_params, run_absl_app
from fsmnet_jax.files import StoragePath, as_path
from fsmnet_jax.model import build_model
from fsmnet_jax.orbax_logs import quiet_orbax_logs

config_flags.DEFINE_config_file('config', None, 'A configs/*.py file (the data and model '
                                'settings of the run).', lock_config=True)
flags.DEFINE_string('checkpoint', None, 'Training workdir, step folder, variables folder or '
                    'PyTorch .pth/.pt/.safetensors file.')
flags.DEFINE_enum('split', 'test', ['test', 'train'], 'Data split to evaluate.')
flags.DEFINE_string('out', None, 'Output folder (default: WORKDIR/eval_SPLIT for a training '
                    'checkpoint, else CHECKPOINT_eval_SPLIT beside it).')
flags.DEFINE_bool('data_consistency', False, 'Also score FSMNet with the measured k-space '
                  'lines put back into its output.')
flags.DEFINE_integer('num_panels', 4, 'Slices drawn as PNG panels (evenly spaced over the split).',
                     lower_bound=0)
flags.DEFINE_enum('precision', 'fp32', list(inference.PRECISIONS), PRECISION_HELP)
flags.DEFINE_bool('overwrite', False, 'Replace an existing output folder.')
flags.DEFINE_bool('debug', False, 'Show tracebacks of errors, orbax\'s included.')
flags.adopt_module_key_flags(distributed)
flags.mark_flags_as_required(['config', 'checkpoint'])
FLAGS = flags.FLAGS


def default_out_dir(checkpoint: StoragePath, split: str, precision: str = 'fp32'
                    ) -> StoragePath:
  """WORKDIR/eval_SPLIT (eval_SPLIT_bf16 in bf16) for a training run's checkpoint, else a
  sibling of the checkpoint."""
  name = f'eval_{split}' + ('' if precision == 'fp32' else f'_{precision}')
  run_config = inference.run_config_file(checkpoint)
  if run_config is not None:
    return run_config.parent / name
  return checkpoint.with_name(f'{checkpoint.stem}_{name}')


def _setup() -> None:
  quiet_orbax_logs(show_tracebacks=FLAGS.debug)
  inference.enable_compilation_cache()
  distributed.initialize()


def _evaluate() -> None:
  config, checkpoint = FLAGS.config, as_path(FLAGS.checkpoint)
  out = (as_path(FLAGS.out) if FLAGS.out
         else default_out_dir(checkpoint, FLAGS.split, FLAGS.precision))
  params, model = load_params(checkpoint, build_model(config))
  report = evaluate.evaluate(config, params, model, out, FLAGS.split, FLAGS.data_consistency,
                             FLAGS.num_panels, FLAGS.overwrite, checkpoint=str(checkpoint),
                             precision=FLAGS.precision)
  if jax.process_index() == 0:  # the one that wrote it
    print((out / 'table1.md').read_text())
  logging.info('%d subjects, %d slices: results in %s', report['num_subjects'],
               report['num_slices'], out)


def run() -> None:
  run_absl_app('fsmnet-eval', _evaluate, __name__, _setup)


if __name__ == '__main__':
  run()
