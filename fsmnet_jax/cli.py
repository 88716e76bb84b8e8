"""fsmnet-reconstruct and fsmnet-export: scans in, reconstructions out; inference as an artifact.

The model and data settings come from `--config` (a configs/*.py file) if given, else from the
training run's config.json when the checkpoint is a workdir or one of its steps, else from the
defaults (configs/default.py for NIfTI, configs/fastmri_4x.py for k-space) with the model
read off the weights.
"""

import argparse
import importlib.util
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Callable

from absl import app, flags
import ml_collections

from fsmnet_jax import export, inference, reconstruct
from fsmnet_jax.checkpoint import CheckpointError
from fsmnet_jax.data import DataError
from fsmnet_jax.model import FSMNet
from fsmnet_jax.reporting import hide_orbax_logs

# Exit status 2: the input or the settings are wrong. 1: a run stopped by its data or the
# machine (non-finite training, a full disk). 130/143: interrupted by SIGINT/SIGTERM.
USER_ERRORS = (CheckpointError, DataError, FileExistsError, ValueError)
RUN_FAULTS = (FloatingPointError, OSError)


class _Terminated(BaseException):
  """SIGTERM, raised like KeyboardInterrupt so that `finally` blocks remove partial outputs."""


def _raise_terminated(signum, frame):
  del signum, frame
  raise _Terminated()


def run_reporting_errors(program: str, command: Callable[[], int | None], debug: bool,
                         user_errors: tuple[type, ...] = USER_ERRORS) -> int:
  """`command()`'s exit status (None: 0). Expected errors become one line on stderr and a
  status (see above); `debug` re-raises them with their traceback. SIGTERM unwinds like
  Ctrl-C, so an output being written is removed rather than left half-written."""
  previous = None
  if threading.current_thread() is threading.main_thread():
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
  try:
    return command() or 0
  except (KeyboardInterrupt, _Terminated) as e:
    name = 'SIGINT' if isinstance(e, KeyboardInterrupt) else 'SIGTERM'
    hide_orbax_logs()  # its threads' complaints as the process ends are not news
    print(f'{program}: stopped by {name}; outputs not finished were removed', file=sys.stderr)
    return 130 if name == 'SIGINT' else 143
  except user_errors + RUN_FAULTS as e:
    if debug:
      raise
    hide_orbax_logs()
    print(f'{program}: error: {e}', file=sys.stderr)
    return 2 if isinstance(e, user_errors) else 1
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def run_absl_app(main: Callable[[list[str]], None], module_name: str) -> None:
  """`absl.app.run(main)` for a console script whose flags and usage text are in
  `module_name`: --help shows them, and exits 0 like argparse's.

  absl takes both from `__main__`, here the console script's stub, and exits 1 after help.
  """
  sys.modules['__main__'].__doc__ = sys.modules[module_name].__doc__
  for flag in flags.FLAGS.get_key_flags_for_module(module_name):
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)
  help_asked = any(arg in ('-h', '-?', '--help', '--helpshort', '--helpfull')
                   for arg in sys.argv[1:])
  try:
    app.run(main, flags_parser=_parse_flags)
  except SystemExit as e:
    if help_asked and e.code == 1:
      sys.exit(0)
    raise


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with one line instead of a traceback for a --config file that does
  not load and a --config.key=value that names no key (ml_collections raises those as
  OSError and AttributeError; absl reports only its own errors)."""
  try:
    remaining = app.parse_flags_with_usage(argv)
    if 'config' in flags.FLAGS:  # a config file that failed to load raises on first use
      flags.FLAGS.config.to_dict()
    return remaining
  except OSError as e:
    problem = f'--config: {str(e).strip().splitlines()[-1].strip()}'
  except (AttributeError, KeyError) as e:
    while e.args and isinstance(e.args[0], Exception):  # ml_collections wraps its KeyError
      e = e.args[0]
    first, *hint = str(e.args[0] if e.args else e).splitlines()  # 'key' [Did you mean ...?]
    key = first.strip('"\'\\ ')
    given = [arg.split('=')[0] for arg in argv[1:] if arg.startswith('--config.') and key in arg]
    problem = (f'{", ".join(given) or key}: no such config key '
               f'({" ".join(hint).strip() or "see the configs/*.py file"})')
  print(f'{Path(argv[0]).name}: error: {problem}', file=sys.stderr)
  sys.exit(2)


def load_config_file(path: Path) -> ml_collections.ConfigDict:
  """`get_config()` of a configs/*.py file."""
  if not path.is_file():
    raise DataError(f'{path}: no such config file')
  spec = importlib.util.spec_from_file_location(f'fsmnet_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def resolve_config(config_file: Path | None, checkpoint: Path, default: str
                   ) -> tuple[ml_collections.ConfigDict, bool]:
  """(config, whether its model section describes the checkpoint)."""
  if config_file is not None:
    return load_config_file(config_file), True
  run_config = inference.run_config_file(checkpoint)
  if run_config is not None:
    return ml_collections.ConfigDict(json.loads(run_config.read_text())), True
  module = importlib.import_module(f'configs.{default}')
  return module.get_config(), False


def _load_model(args: argparse.Namespace, default_config: str):
  config, describes_model = resolve_config(args.config, args.checkpoint, default_config)
  model = FSMNet(**config.model) if describes_model else None
  params, model = inference.load_params(args.checkpoint, model, config.model.use_spa_att)
  return config, params, model


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument('--checkpoint', type=Path, required=True,
                      help='training workdir (latest step), step folder, variables folder, or '
                           'PyTorch .pth/.pt/.safetensors (needs torch)')
  parser.add_argument('--config', type=Path,
                      help='configs/*.py file with the model and data settings (default: the '
                           "run's config.json, else the defaults)")
  parser.add_argument('--overwrite', action='store_true',
                      help='replace existing outputs (default: refuse)')
  parser.add_argument('--debug', action='store_true', help='show tracebacks of errors')


def run_command(name: str, parser: argparse.ArgumentParser, command: Callable[..., int],
                argv: list[str] | None, user_errors: tuple[type, ...] = USER_ERRORS) -> int:
  """Parses `argv` and runs `command(args)` through `run_reporting_errors`."""
  args = parser.parse_args(argv)
  return run_reporting_errors(name, lambda: command(args), args.debug, user_errors)


def _reconstruct(args: argparse.Namespace) -> int:
  from_kspace = args.kspace is not None
  if from_kspace == (args.t2 is not None):
    raise ValueError('give either --t1 and --t2 (NIfTI) or --kspace and --reference (h5)')
  if (args.t1 is not None) == from_kspace or (args.reference is not None) != from_kspace:
    raise ValueError('--t2 goes with --t1, --kspace with --reference')
  inference.enable_compilation_cache()
  config, params, model = _load_model(args, 'fastmri_4x' if from_kspace else 'default')
  reconstructor = inference.Reconstructor(model, params, args.batch_size)
  settings = dict(out=args.out, acceleration=args.acceleration, seed=args.seed,
                  with_data_consistency=args.data_consistency, overwrite=args.overwrite)
  if from_kspace:
    result = reconstruct.reconstruct_kspace(reconstructor, config.data, args.kspace,
                                            args.reference, **settings)
  else:
    result = reconstruct.reconstruct_nifti(reconstructor, config.data, args.t1, args.t2,
                                           **settings)
  print(f'wrote {args.out} ({len(result.image)} slices of {result.image.shape[1]}x'
        f'{result.image.shape[2]}, {result.mask.size / result.mask.sum():.2f}x sampling) and '
        f'{reconstruct.mask_path(args.out)}')
  if result.psnr:
    print(f'against the fully-sampled input (fastMRI convention): zero-filled '
          f'{result.psnr["zero_filled"]:.2f} dB, FSMNet'
          f'{" + data consistency" if args.data_consistency else ""} '
          f'{result.psnr["fsmnet"]:.2f} dB')
  return 0


def reconstruct_main(argv: list[str] | None = None) -> int:
  """fsmnet-reconstruct: reconstructs whole scans with a trained FSMNet."""
  parser = argparse.ArgumentParser(
      prog='fsmnet-reconstruct',
      description='Reconstruct a whole scan with a trained FSMNet. From NIfTI images: '
                  '--t1 T1 --t2 T2 --acceleration N simulates the undersampling of T2 with a '
                  'seeded mask. From k-space: --kspace a fastMRI single-coil .h5 (its "mask", '
                  'else its non-zero lines, else --acceleration simulates one) and --reference '
                  'the fully-sampled reference contrast .h5. The mask used is saved as '
                  'OUT_mask.npy.')
  _add_model_arguments(parser)
  parser.add_argument('--t1', type=Path, help='reference contrast, NIfTI')
  parser.add_argument('--t2', type=Path, help='fully-sampled target contrast, NIfTI')
  parser.add_argument('--kspace', type=Path, help='target k-space, fastMRI single-coil .h5')
  parser.add_argument('--reference', type=Path,
                      help='fully-sampled reference contrast k-space, fastMRI single-coil .h5')
  parser.add_argument('--acceleration', type=int,
                      help='undersampling factor to simulate (default: the config\'s; '
                           'k-space files with measured lines ignore it)')
  parser.add_argument('--seed', type=int, default=0, help='seed of the simulated mask')
  parser.add_argument('--data-consistency', action='store_true',
                      help='put the measured k-space lines back into the output')
  parser.add_argument('--batch-size', type=int, default=8,
                      help='slices per step, split over the local devices')
  parser.add_argument('--out', type=Path, required=True,
                      help='output: .nii/.nii.gz (keeps a NIfTI input\'s affine and header) or, '
                           'from k-space, .h5 with a "reconstruction" dataset')
  return run_command('fsmnet-reconstruct', parser, _reconstruct, argv)


def _export(args: argparse.Namespace) -> int:
  config, params, model = _load_model(args, 'default')
  size = args.image_size or config.data.image_size
  exported = export.export_inference(model, params, size, args.batch_size or None,
                                     args.platforms.split(','))
  path = export.save_exported(exported, args.out, args.overwrite)
  batch = args.batch_size or 'any'
  print(f'wrote {path}: ({batch}, {size}, {size}) zero-filled and reference slices -> '
        f'reconstruction, for {", ".join(exported.platforms)}; load it with '
        f'jax.export.deserialize(open(path, "rb").read()).call(under, reference)')
  return 0


def export_main(argv: list[str] | None = None) -> int:
  """fsmnet-export: writes FSMNet inference as a serialized jax.export artifact."""
  parser = argparse.ArgumentParser(
      prog='fsmnet-export',
      description='Serialize FSMNet inference (weights included) with jax.export: a function '
                  'of (batch, H, W) float32 zero-filled target and reference intensities '
                  'returning the reconstruction, runnable without the model code.')
  _add_model_arguments(parser)
  parser.add_argument('--out', type=Path, required=True, help='artifact file to write')
  parser.add_argument('--image-size', type=int, default=0,
                      help='slice side H = W (default: config.data.image_size)')
  parser.add_argument('--batch-size', type=int, default=0,
                      help='fixed batch size (default 0: symbolic, any batch)')
  parser.add_argument('--platforms', default='cpu',
                      help='comma-separated platforms to lower for, e.g. cpu,cuda,tpu')
  return run_command('fsmnet-export', parser, _export, argv)


if __name__ == '__main__':
  sys.exit(reconstruct_main())
