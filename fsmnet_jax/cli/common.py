"""What the console scripts share: one-line errors with exit codes, signals, flag parsing, and
loading a trained model with its config.

Exit status 2: the input or the settings are wrong. 1: a run stopped by its data or the machine
(non-finite training, a full disk). 130/143: interrupted by SIGINT/SIGTERM; outputs being
written are removed, never left half-written.
"""

import argparse
import importlib.util
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from absl import app, flags
from absl import logging as absl_logging
import ml_collections
from ml_collections import config_flags

from fsmnet_jax import configs, inference
from fsmnet_jax.checkpoint import CheckpointError, describe_error
from fsmnet_jax.data import DataError, pipeline
from fsmnet_jax.files import as_path
from fsmnet_jax.model import FSMNet, build_model
from fsmnet_jax.orbax_logs import hide_orbax_logs

CONFIG_DIR = Path(configs.__file__).parent  # the checkout's configs/, installed with the package

USER_ERRORS = (CheckpointError, DataError, FileExistsError, ValueError)
RUN_FAULTS = (FloatingPointError, OSError)


class _Terminated(BaseException):
  """SIGTERM, raised like KeyboardInterrupt so that `finally` blocks remove partial outputs."""


def _raise_terminated(signum, frame):
  del signum, frame
  raise _Terminated()


def run_reporting_errors(program: str, command: Callable[[], int | None], debug: bool,
                         user_errors: tuple[type, ...] = USER_ERRORS,
                         run_faults: tuple[type, ...] = RUN_FAULTS) -> int:
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
  except user_errors + run_faults as e:
    if debug:
      raise
    hide_orbax_logs()
    print(f'{program}: error: {e}', file=sys.stderr)
    return 2 if isinstance(e, user_errors) else 1
  finally:
    if previous is not None:
      signal.signal(signal.SIGTERM, previous)


def int_at_least(minimum: int) -> Callable[[str], int]:
  """An argparse type: an integer of at least `minimum` (argparse's error names the flag)."""
  def parse(text: str) -> int:
    value = int(text)  # a ValueError: argparse reports an invalid value
    if value < minimum:
      raise argparse.ArgumentTypeError(f'must be at least {minimum}, got {value}')
    return value
  parse.__name__ = 'integer'
  return parse


def run_command(name: str, parser: argparse.ArgumentParser, command: Callable[..., int],
                argv: list[str] | None, user_errors: tuple[type, ...] = USER_ERRORS) -> int:
  """Parses `argv` and runs `command(args)` through `run_reporting_errors`."""
  args = parser.parse_args(argv)
  return run_reporting_errors(name, lambda: command(args), args.debug, user_errors)


def run_absl_app(program: str, command: Callable[[], int | None], module_name: str,
                 setup: Callable[[], None] = lambda: None) -> None:
  """Runs the console script `program`: parses the flags defined in `module_name` (refusing
  other arguments), logs at INFO, calls `setup()` and then `command()` through
  `run_reporting_errors` (its --debug flag shows tracebacks), and exits with its status.
  --help shows the flags and usage text of `module_name`, and exits 0 like argparse's.

  absl takes both from `__main__`, here the console script's stub, and exits 1 after help.
  """
  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
    absl_logging.set_verbosity(absl_logging.INFO)
    # boto's INFO lines (where it found credentials and the endpoint) come with every s3 client.
    for boto in ('botocore', 'aiobotocore'):
      logging.getLogger(boto).setLevel(logging.WARNING)
    setup()
    sys.exit(run_reporting_errors(program, command, flags.FLAGS.debug))

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
  """absl's flag parsing, with one line and exit status 2 for a flag absl refuses (its own
  message: FATAL, status 1), a --config file that does not load and a --config.key=value that
  names no key (ml_collections raises those as OSError, AttributeError or what the file's own
  code raises; absl reports only its own errors)."""
  try:
    remaining = flags.FLAGS(argv)
    if 'config' in flags.FLAGS:  # a config file that failed to load raises on first use
      _check_loaded_config(flags.FLAGS.config, _config_argument(argv[1:]))
    return remaining
  except flags.Error as e:  # a --config.key=value of the wrong type, say
    problem = str(e)
  except OSError as e:
    problem = f'--config: {str(e).strip().splitlines()[-1].strip()}'
  except (AttributeError, KeyError) as e:
    problem = _unknown_key(e, argv[1:])
  except DataError as e:
    problem = f'--config: {e}'
  except Exception as e:  # pylint: disable=broad-except
    # Flag parsing runs the --config file: whatever it raises means that file does not load.
    problem = f'--config: {_not_a_config(_config_argument(argv[1:]), e)}'
  print(f'{Path(argv[0]).name}: error: {problem}', file=sys.stderr)
  sys.exit(2)


def _config_argument(arguments: list[str]) -> str:
  """The file given as --config in `arguments`."""
  for i, argument in enumerate(arguments):
    if argument.startswith('--config='):
      return argument.split('=', 1)[1]
    if argument == '--config' and i + 1 < len(arguments):
      return arguments[i + 1]
  return '--config'


def _not_a_config(path: str | Path, error: Exception) -> str:
  """Why `path` does not load as a config file, in one line."""
  hint = ('; a run\'s config.json is read from the run itself: give the run as --checkpoint, '
          'or as --workdir to resume it' if str(path).endswith('.json') else '')
  return (f'{path}: not a config file, a Python file with get_config() as configs/*.py '
          f'({describe_error(error)}){hint}')


def _check_loaded_config(config: Any, path: str | Path) -> ml_collections.ConfigDict:
  """`config` if `get_config()` gave a ConfigDict, else a DataError naming `path`."""
  if not isinstance(config, ml_collections.ConfigDict):
    if hasattr(config, 'to_dict'):  # ml_collections' stand-in for a file that did not load
      config.to_dict()  # raises that file's error
    raise DataError(f'{path}: its get_config() returned {type(config).__name__}, not an '
                    'ml_collections.ConfigDict')
  config.to_dict()
  return config


def _unknown_key(error: AttributeError | KeyError, arguments: list[str]) -> str:
  """What ml_collections' error for a --config.key that names no key means, in one line."""
  while error.args and isinstance(error.args[0], Exception):  # it wraps its KeyError
    error = error.args[0]
  first, *hint = str(error.args[0] if error.args else error).splitlines()  # 'key' [Did you ...]
  key = first.strip('"\'\\ ')
  given = [arg.split('=')[0] for arg in arguments if arg.startswith('--config.') and key in arg]
  return (f'{", ".join(given) or key}: no such config key '
          f'({" ".join(hint).strip() or "see the configs/*.py file"})')


def load_config_file(path: Path) -> ml_collections.ConfigDict:
  """`get_config()` of a configs/*.py file, else a DataError naming the file."""
  if not path.is_file():
    raise DataError(f'{path}: no such config file')
  if path.suffix != '.py':
    raise DataError(_not_a_config(path, ValueError(f'a {path.suffix or "suffixless"} file')))
  spec = importlib.util.spec_from_file_location(f'fsmnet_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    config = module.get_config()
  except Exception as e:  # pylint: disable=broad-except
    raise DataError(_not_a_config(path, e)) from e  # the file's own code raised it
  return _check_loaded_config(config, path)


def check_data_settings(config: ml_collections.ConfigDict) -> None:
  """ValueError naming the config.data settings changed from configs/default.py that the
  configured data set does not read (a `sites` filter on BraTS would silently do nothing)."""
  unread = pipeline.unread_settings(config.data,
                                    load_config_file(CONFIG_DIR / 'default.py').data)
  if unread:
    raise ValueError(f'config.data.dataset={config.data.dataset!r} does not read '
                     f'{"; ".join(unread)}: remove the setting or choose the data set')


def override_config(config: ml_collections.ConfigDict, arguments: list[str]
                    ) -> ml_collections.ConfigDict:
  """`config` with the `--config.key=value` (or `--config.key value`) arguments applied by
  ml_collections' config flag, as on fsmnet-train's command line."""
  argv = ['override_config', *arguments]
  flag_values = flags.FlagValues()
  try:  # the flag reads its overrides from `argv` as it is defined
    config_flags.DEFINE_config_dict('config', config, flag_values=flag_values, lock_config=False,
                                    sys_argv=argv)
    rest = flag_values(argv)[1:]
  except flags.Error as e:
    raise ValueError(str(e)) from e
  except (AttributeError, KeyError) as e:
    raise ValueError(_unknown_key(e, arguments)) from e
  if rest:
    raise ValueError(f'{" ".join(rest)}: not a --config.key=value argument')
  return flag_values.config


def load_params(checkpoint: Path, model: FSMNet | None = None, use_spa_att: bool = False
                ) -> tuple[dict[str, Any], FSMNet]:
  """`inference.load_params`, or for a PyTorch file `torch_port.checkpoint.load_params`."""
  if checkpoint.suffix not in inference.TORCH_SUFFIXES:
    return inference.load_params(checkpoint, model, use_spa_att)
  try:
    from torch_port import checkpoint as torch_checkpoint  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise CheckpointError(f'{checkpoint}: reading PyTorch checkpoints needs torch; install the '
                          f'extra: pip install "fsmnet-jax[torch]" ({e})') from e
  return torch_checkpoint.load_params(checkpoint, model, use_spa_att)


def load_model(checkpoint: Path, config_file: Path | None, default_config: str
               ) -> tuple[ml_collections.ConfigDict, dict[str, Any], FSMNet]:
  """(config, params, model) of a trained model. The config is `config_file` if given, else
  the training run's config.json when `checkpoint` belongs to one, else configs/DEFAULT.py
  with the model read off the weights."""
  if config_file is not None:
    config = load_config_file(config_file)
  elif (run_config := inference.run_config_file(checkpoint)) is not None:
    try:
      config = ml_collections.ConfigDict(json.loads(run_config.read_text()))
    except json.JSONDecodeError as e:
      raise DataError(f'{run_config}: the run\'s config is not readable JSON ({e}); give the '
                      'settings as --config') from e
  else:
    config = load_config_file(CONFIG_DIR / f'{default_config}.py')
    params, model = load_params(checkpoint, None, config.model.use_spa_att)
    return config, params, model
  params, model = load_params(checkpoint, build_model(config))
  return config, params, model


PRECISION_HELP = ('the network\'s compute dtype: fp32, or bf16 (bfloat16 convolutions; the FFT '
                  'blocks and the output float32), for GPUs, TPUs and CPUs with bfloat16 units '
                  '(docs/benchmarks.md: its speed and accuracy)')


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
  """--checkpoint, --config, --overwrite, --debug and --precision of the commands that load a
  model."""
  parser.add_argument('--checkpoint', type=as_path, required=True,
                      help='training workdir (latest step), step folder, variables folder, or '
                           'PyTorch .pth/.pt/.safetensors (needs torch)')
  parser.add_argument('--config', type=Path,
                      help='configs/*.py file with the model and data settings (default: the '
                           "run's config.json, else the defaults)")
  parser.add_argument('--overwrite', action='store_true',
                      help='replace existing outputs (default: refuse)')
  parser.add_argument('--debug', action='store_true', help='show tracebacks of errors')
  parser.add_argument('--precision', choices=list(inference.PRECISIONS), default='fp32',
                      help=PRECISION_HELP)
