"""fsmnet-parity: shows that fsmnet-jax computes, and trains, as the PyTorch reference does.

  fsmnet-parity forward CHECKPOINT [--size 64]
  fsmnet-parity train --config configs/demo.py --config.data.root demo_data \\
      --frameworks jax,torch --seeds 5 --steps 1000 --out parity/demo
  fsmnet-parity ablation --config configs/demo.py --config.data.root demo_data \\
      --seeds 3 --steps 1000 --out parity/table2

`train` runs each (framework, seed) in its own process from the same initial weights (the
reference's initialisation at that seed) on the same batches, then writes OUT/report.json,
report.md, curves.png and divergence.png (docs/parity.md). Repeated with the same settings, it
keeps the finished runs and runs only the missing ones (more seeds, say). `ablation` trains
the four networks of the paper's Table 2 that way and writes OUT/table2.md.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_collections

from fsmnet_jax import train as train_lib
from fsmnet_jax.checkpoint import CheckpointError
from fsmnet_jax.cli.common import (CONFIG_DIR, RUN_FAULTS, check_data_settings,
                                   load_config_file, override_config, run_reporting_errors)
from fsmnet_jax.data import DataError, pipeline
from fsmnet_jax.files import write_atomically
from fsmnet_jax.model import build_model
from fsmnet_jax.reporting import cpu_model
from torch_port.checkpoint import load_state_dict, save_state_dict
from torch_port.cli import describe, load_both, report_parity
from torch_port.convert import ConversionError
from torch_port.model import TorchFSMNet
from torch_port.parity_report import failed, markdown, write_report, write_table2
from torch_port.parity_runs import (FRAMEWORKS, REFERENCE, REFERENCE_NOISE, RUN_FILE,
                                    TABLE2_ROWS, initial_state_dict, run_config, run_name,
                                    table2_config, train_run)

USER_ERRORS = (CheckpointError, ConversionError, DataError, FileExistsError, FileNotFoundError,
               ValueError)
SETTINGS_FILE = 'parity.json'
# What makes runs comparable: an --out folder holds runs of one of each.
SAME_RUNS = ('config', 'steps', 'dtype')


class RunFailed(RuntimeError):
  """A (framework, seed) run ended with an error; its log says why."""


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='fsmnet-parity', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--debug', action='store_true', help='show tracebacks of errors')
  commands = parser.add_subparsers(dest='command', required=True)

  forward = commands.add_parser(
      'forward', help='one forward pass of both frameworks with the weights of a checkpoint',
      description='Runs TorchFSMNet and the Flax FSMNet on the same random inputs with the '
                  'weights of a checkpoint, in float64 and float32 (docs/parity.md).')
  forward.add_argument('source', type=Path,
                       help='a PyTorch checkpoint file or a Flax orbax checkpoint folder')
  forward.add_argument('--use-spa-att', action='store_true',
                       help='the weights are of a model trained with use_spa_att=True')
  forward.add_argument('--size', type=int, default=64, help='image side (default 64)')
  forward.add_argument('--seed', type=int, default=0, help='seed of the random inputs')

  def add_runs(name: str, help_text: str, description: str, frameworks: str
               ) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=help_text, description=description)
    command.add_argument('--config', type=Path, required=True, help='a configs/*.py file')
    command.add_argument('--frameworks', default=frameworks,
                         help=f'comma-separated, of {", ".join(FRAMEWORKS)} (default '
                              f'{frameworks})')
    command.add_argument('--seeds', type=int, default=2,
                         help='seeds config.seed, +1, ...: initial weights and batch order '
                              '(default 2)')
    command.add_argument('--steps', type=int,
                         help='steps per run (default config.train.num_steps)')
    command.add_argument('--out', type=Path, required=True, help='folder of the runs and report')
    return command

  train = add_runs(
      'train', 'train both frameworks from the same weights on the same batches',
      'Trains each framework from the same initial weights on the same batches, several '
      'seeds, and reports how far they end apart (docs/parity.md). Any --config.key=value '
      'overrides the config file.', 'jax,torch')
  train.add_argument('--float64', action='store_true',
                     help='parameters and computation in float64 (the same-algorithm check)')
  train.add_argument('--noise-seeds', type=int, default=1,
                     help=f'for the first N seeds, also run {" and ".join(REFERENCE_NOISE)}: '
                          "the reference's own rounding noise (default 1)")
  ablation = add_runs(
      'ablation', "the paper's Table 2 in miniature: its four networks, several seeds",
      "Trains the four networks of the paper's Table 2 (MDUNet, + FSFE, + CMS-fusion, "
      '+ FS-fusion) on the same data, each as `train` does into OUT/<row>, and writes '
      "OUT/table2.md beside the paper's numbers (the torch twin has no MDUNet).", 'jax')
  ablation.add_argument('--rows', default=','.join(TABLE2_ROWS),
                        help=f'comma-separated, of {", ".join(TABLE2_ROWS)} (default all)')

  # One run, in its own process: what `train` starts for each (framework, seed).
  worker = commands.add_parser('worker')
  worker.add_argument('--out', type=Path, required=True)
  worker.add_argument('--framework', choices=FRAMEWORKS, required=True)
  worker.add_argument('--seed', type=int, required=True)
  return parser


def forward(args: argparse.Namespace) -> int:
  state_dict, variables, model = load_both(args.source, args.use_spa_att)
  print(describe(args.source, state_dict, variables, model))
  return 0 if report_parity(state_dict, variables, model, args.size, args.seed) else 1


def _frameworks(text: str) -> list[str]:
  frameworks = [f.strip() for f in text.split(',') if f.strip()]
  unknown = [f for f in frameworks if f not in FRAMEWORKS]
  if unknown or not frameworks:
    raise ValueError(f'--frameworks {text}: unknown framework {", ".join(unknown) or "(none)"}; '
                     f'use {", ".join(FRAMEWORKS)}')
  return frameworks


def _check_buildable(config: ml_collections.ConfigDict, frameworks: list[str]) -> None:
  """ValueError naming what of `config` the frameworks cannot run, before any run starts."""
  train_lib.check_settings(config)  # each run has one device
  try:
    build_model(config)
  except (TypeError, ValueError) as e:
    raise ValueError(f'config.model cannot be built: {e}') from e
  if frameworks != ['jax']:
    if config.train.compute_dtype != 'float32':
      raise ValueError(f'config.train.compute_dtype={config.train.compute_dtype!r}: the torch '
                       'twin trains in float32, or in float64 with --float64; leave it float32')
    if config.mesh.model != 1:
      raise ValueError(f'config.mesh.model={config.mesh.model}: the torch twin has no model '
                       'parallelism; use 1')
    if config.model_name != 'fsmnet':
      raise ValueError(f'config.model_name={config.model_name!r}: the torch twin is FSMNet '
                       'only; train this network with --frameworks jax')
    try:
      TorchFSMNet(**config.model)
    except (TypeError, ValueError) as e:
      raise ValueError(f'config.model cannot be built by the torch twin: {e}') from e


def _differences(ours: dict, theirs: dict, prefix: str = '') -> list[str]:
  """'key: ours here, theirs there' for each leaf where two nested dicts differ."""
  differences = []
  for key in sorted(set(ours) | set(theirs)):
    a, b = ours.get(key), theirs.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      differences += _differences(a, b, f'{prefix}{key}.')
    elif a != b:
      differences.append(f'{prefix}{key} {a!r} here, {b!r} there')
  return differences


def _settings(args: argparse.Namespace, config: ml_collections.ConfigDict,
              frameworks: list[str], overrides: list[str], float64: bool) -> dict:
  """The settings that make runs comparable (recorded in OUT), once `config` is runnable."""
  _check_buildable(config, frameworks)
  steps = config.train.num_steps if args.steps is None else args.steps
  if steps < 1 or args.seeds < 1:
    raise ValueError('--steps and --seeds must be at least 1')
  return {'config_file': str(args.config), 'overrides': ' '.join(overrides),
          'config': _as_recorded(config.to_dict()), 'steps': steps,
          'dtype': 'float64' if float64 else 'float32', 'machine': cpu_model()}


def _check_data(config: ml_collections.ConfigDict) -> None:
  """DataError unless both splits of `config`'s data can be read (and ValueError for settings
  the data set does not read): before any run starts."""
  check_data_settings(config)
  for split in ('train', 'test'):
    pipeline.make_source(config, split)


def _with_defaults(recorded: dict, defaults: dict) -> dict:
  """`recorded` with the keys it lacks taken from `defaults`: runs recorded before a config key
  existed ran as its default does."""
  merged = dict(defaults)
  for key, value in recorded.items():
    both_dicts = isinstance(value, dict) and isinstance(defaults.get(key), dict)
    merged[key] = _with_defaults(value, defaults[key]) if both_dicts else value
  return merged


def _as_recorded(value: Any) -> Any:
  """`value` as parity.json gives it back (tuples become lists), so that settings compare
  equal to their record."""
  return json.loads(json.dumps(value))


def _recorded_settings(out: Path) -> dict:
  """The settings recorded in `out`, their config completed with today's defaults."""
  recorded = json.loads((out / SETTINGS_FILE).read_text())
  defaults = _as_recorded(load_config_file(CONFIG_DIR / 'default.py').to_dict())
  recorded['config'] = _with_defaults(recorded.get('config') or {}, defaults)
  return recorded


def _claim(out: Path, settings: dict) -> None:
  """Records `settings` in `out`, or refuses an `out` that holds runs of other settings."""
  path = out / SETTINGS_FILE
  if path.exists():
    recorded = _recorded_settings(out)
    differences = _differences({k: settings[k] for k in SAME_RUNS},
                               {k: recorded.get(k) for k in SAME_RUNS})
    if differences:
      raise ValueError(f'{out} holds runs of other settings ({"; ".join(differences[:3])}); '
                       'pass another --out')
  else:
    out.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(settings, indent=1)))


def _initial_weights(out: Path, config: ml_collections.ConfigDict, seed: int) -> None:
  """The reference's initialisation at `seed`, where the twin has the network (else the JAX
  runs draw their own, as fsmnet-train does)."""
  path = out / 'initial' / f'seed{seed}.safetensors'
  if config.model_name == 'fsmnet' and not path.exists():
    save_state_dict(initial_state_dict(config, seed), path)


def _launch(out: Path, framework: str, seed: int, float64: bool) -> None:
  """Runs one (framework, seed) in a process of its own, its output in runs/NAME.log."""
  name = run_name(framework, seed)
  log = out / 'runs' / f'{name}.log'
  env = {**os.environ, **({'JAX_ENABLE_X64': '1'} if float64 else {})}
  # What a run killed while writing left (its folder is written under a temporary name).
  for leftover in (out / 'runs').glob(f'.partial-*-{name}'):
    shutil.rmtree(leftover)
  with open(log, 'w') as stream:
    returncode = subprocess.run(
        [sys.executable, '-m', 'torch_port.parity_cli', 'worker', '--out', str(out),
         '--framework', framework, '--seed', str(seed)],
        stdout=stream, stderr=subprocess.STDOUT, env=env, check=False).returncode
  if returncode:
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    raise RunFailed(f'run {name} failed (exit {returncode}): '
                    f'{lines[-1].strip() if lines else "no output"} (log: {log})')


def _run_seeds(out: Path, config: ml_collections.ConfigDict, settings: dict,
               frameworks: list[str], seeds: int, noise_seeds: int) -> dict:
  """Runs what `out` lacks of `frameworks` x `seeds` (and the reference's noise runs for the
  first `noise_seeds` seeds); returns the report it then writes. `out` is claimed already."""
  (out / 'runs').mkdir(exist_ok=True)
  for index, seed in enumerate(range(config.seed, config.seed + seeds)):
    _initial_weights(out, config, seed)
    noise = list(REFERENCE_NOISE) if index < noise_seeds and REFERENCE in frameworks else []
    for framework in dict.fromkeys(frameworks + noise):
      name = run_name(framework, seed)
      if (out / 'runs' / name / RUN_FILE).exists():
        print(f'{name}: finished earlier, kept')
        continue
      print(f'{name}: training {settings["steps"]} steps ...', flush=True)
      _launch(out, framework, seed, settings['dtype'] == 'float64')
      run = json.loads((out / 'runs' / name / RUN_FILE).read_text())
      print(f'{name}: done in {run["seconds"]:.0f} s; final loss {run["losses"][-1]:.5g}, '
            f'test PSNR {run["eval"]["eval_psnr"]:.3f} dB', flush=True)
  return write_report(out, settings)


def train(args: argparse.Namespace, overrides: list[str]) -> int:
  frameworks = _frameworks(args.frameworks)
  if args.noise_seeds < 0:
    raise ValueError('--noise-seeds must be at least 0')
  config = override_config(load_config_file(args.config), overrides)
  settings = _settings(args, config, frameworks, overrides, args.float64)
  _check_data(config)
  _claim(args.out, settings)
  report = _run_seeds(args.out, config, settings, frameworks, args.seeds, args.noise_seeds)
  verdicts = [line for line in markdown(settings, report).splitlines()
              if line.startswith(('## Seed', '- '))]
  print('\n'.join(verdicts))
  print(f'wrote {args.out / "report.md"}, report.json, curves.png, divergence.png')
  return _status(report)


def _status(report: dict) -> int:
  """1 (and the failed verdicts on stderr) if a verdict failed, else 0."""
  names = failed(report)
  if names:
    print(f'fsmnet-parity: FAIL: {", ".join(names)}', file=sys.stderr)
  return 1 if names else 0


def ablation(args: argparse.Namespace, overrides: list[str]) -> int:
  frameworks = _frameworks(args.frameworks)
  base = override_config(load_config_file(args.config), overrides)
  chosen = [row.strip() for row in args.rows.split(',') if row.strip()]
  if not chosen or set(chosen) - set(TABLE2_ROWS):
    raise ValueError(f'--rows {args.rows}: use some of {", ".join(TABLE2_ROWS)}')
  rows = {row: table2_config(base, row) for row in TABLE2_ROWS if row in chosen}
  settings = {row: _settings(args, config, frameworks, overrides, float64=False)
              for row, config in rows.items()}
  _check_data(base)  # the rows differ in their network only
  for row, row_settings in settings.items():  # a folder of other runs stops it before any run
    _claim(args.out / row, row_settings)
  reports = {}
  for row, config in rows.items():
    print(f'Table 2, {TABLE2_ROWS[row]}:', flush=True)
    reports[row] = _run_seeds(args.out / row, config, settings[row], frameworks, args.seeds, 0)
  print(write_table2(args.out, reports, base.data.acceleration))
  return max(_status(report) for report in reports.values())


def worker(args: argparse.Namespace) -> int:
  settings = _recorded_settings(args.out)
  float64 = settings['dtype'] == 'float64'
  if float64:
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update('jax_enable_x64', True)
  config = run_config(ml_collections.ConfigDict(settings['config']), args.seed, float64)
  initial_file = args.out / 'initial' / f'seed{args.seed}.safetensors'
  initial = load_state_dict(initial_file) if config.model_name == 'fsmnet' else None
  train_run(args.framework, config, settings['steps'], initial,
            args.out / 'runs' / run_name(args.framework, args.seed))
  return 0


def main(argv: list[str] | None = None) -> int:
  parser = _parser()
  argv = sys.argv[1:] if argv is None else argv
  args, rest = parser.parse_known_args(argv)
  if rest and args.command not in ('train', 'ablation'):
    parser.error(f'unrecognized arguments: {" ".join(rest)}')
  commands = {'forward': lambda: forward(args), 'train': lambda: train(args, rest),
              'ablation': lambda: ablation(args, rest), 'worker': lambda: worker(args)}
  return run_reporting_errors('fsmnet-parity', commands[args.command], args.debug,
                              USER_ERRORS, RUN_FAULTS + (RunFailed,))


if __name__ == '__main__':
  sys.exit(main())
