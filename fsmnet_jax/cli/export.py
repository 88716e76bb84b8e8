"""fsmnet-export: FSMNet inference (weights included) as a serialized jax.export artifact.

The model settings come from `--config`, the training run's config.json, or the weights
(see fsmnet-reconstruct).
"""

import argparse
import sys

from fsmnet_jax import export
from fsmnet_jax.cli.common import add_model_arguments, int_at_least, load_model, run_command
from fsmnet_jax.files import as_path


def _export(args: argparse.Namespace) -> int:
  config, params, model = load_model(args.checkpoint, args.config, 'default')
  size = args.image_size or config.data.image_size
  exported = export.export_inference(model, params, size, args.batch_size or None,
                                     args.platforms.split(','), args.precision)
  path = export.save_exported(exported, args.out, args.overwrite)
  batch = args.batch_size or 'any'
  print(f'wrote {path}: ({batch}, {size}, {size}) zero-filled and reference slices -> '
        f'reconstruction ({args.precision}), for {", ".join(exported.platforms)}; load it with '
        f'jax.export.deserialize(open(path, "rb").read()).call(under, reference)')
  return 0


def main(argv: list[str] | None = None) -> int:
  """fsmnet-export: writes FSMNet inference as a serialized jax.export artifact."""
  parser = argparse.ArgumentParser(
      prog='fsmnet-export',
      description='Serialize FSMNet inference (weights included) with jax.export: a function '
                  'of (batch, H, W) float32 zero-filled target and reference intensities '
                  'returning the reconstruction, runnable without the model code.')
  add_model_arguments(parser)
  parser.add_argument('--out', type=as_path, required=True, help='artifact file to write')
  parser.add_argument('--image-size', type=int_at_least(0), default=0,
                      help='slice side H = W (default: config.data.image_size)')
  parser.add_argument('--batch-size', type=int_at_least(0), default=0,
                      help='fixed batch size (default 0: symbolic, any batch)')
  parser.add_argument('--platforms', default='cpu',
                      help='comma-separated platforms to lower for, e.g. cpu,cuda,tpu')
  return run_command('fsmnet-export', parser, _export, argv)


if __name__ == '__main__':
  sys.exit(main())
