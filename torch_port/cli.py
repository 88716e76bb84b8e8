"""fsmnet-convert: move FSMNet weights between PyTorch checkpoints and Flax orbax checkpoints."""

import argparse
import sys
from pathlib import Path

import torch

from fsmnet_jax.checkpoint import CheckpointError, load_variables, save_variables
from fsmnet_jax.cli.common import run_command
from fsmnet_jax.model import FSMNet, count_params
from torch_port.checkpoint import load_state_dict, save_state_dict
from torch_port.convert import (ConversionError, flax_to_torch, infer_model,
                                infer_model_from_flax, model_attributes, torch_to_flax)
from torch_port.model import TorchFSMNet
from torch_port.parity import check_parity

USER_ERRORS = (CheckpointError, ConversionError, FileExistsError, FileNotFoundError, ValueError)


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='fsmnet-convert', description=__doc__,
      epilog='Both commands print the parameter count and run a parity check of the two '
             'frameworks on random inputs (float64 and float32; see docs/from-pytorch.md); '
             'fsmnet-parity forward runs that check alone.')
  parser.add_argument('--debug', action='store_true', help='show tracebacks of errors')
  commands = parser.add_subparsers(dest='command', required=True)

  def add(name, help_text, source, destination):
    command = commands.add_parser(name, help=help_text, description=help_text)
    command.add_argument('source', type=Path, help=source)
    command.add_argument('destination', type=Path, help=destination)
    command.add_argument('--overwrite', action='store_true',
                         help='replace an existing destination (default: refuse)')
    command.add_argument('--use-spa-att', action='store_true',
                         help='the weights are of a model trained with use_spa_att=True')
    command.add_argument('--check-size', type=int, default=64,
                         help='image side of the parity check (default 64; 0 skips it)')
    command.add_argument('--check-seed', type=int, default=0, help='seed of its random inputs')
    return command

  add('torch2flax', 'Convert a reference-format PyTorch checkpoint to a Flax orbax checkpoint.',
      'a .pth/.pt/.safetensors state_dict (bare, nested under network/state_dict/model, or with '
      'DataParallel "module." keys)', 'output orbax checkpoint folder')
  add('flax2torch', 'Convert a Flax orbax checkpoint to a reference-format PyTorch state_dict.',
      'orbax checkpoint folder written by torch2flax or save_variables',
      'output file: .pth/.pt (torch.save) or .safetensors')
  return parser


def load_both(source: Path, use_spa_att: bool):
  """(state_dict, variables, model) from a PyTorch file or a Flax folder."""
  if source.is_dir():
    variables = load_variables(source)
    model = infer_model_from_flax(variables, use_spa_att)
    return flax_to_torch(variables, model), variables, model
  state_dict = load_state_dict(source)
  try:
    model = infer_model(state_dict, use_spa_att)
    return state_dict, torch_to_flax(state_dict, model), model
  except ConversionError as e:
    raise ConversionError(f'{source}: {e}') from e


def describe(source: Path, state_dict: dict, variables: dict, model: FSMNet) -> str:
  """One line: the model's settings and its parameter count."""
  attributes = ', '.join(f'{k}={v}' for k, v in model_attributes(model).items())
  return (f'{source}: FSMNet({attributes}), {count_params(variables):,} parameters in '
          f'{len(state_dict)} tensors')


def report_parity(state_dict: dict, variables: dict, model: FSMNet, size: int, seed: int
                  ) -> bool:
  """Prints the forward parity check of the two frameworks with these weights; True if it
  passed."""
  torch_model = TorchFSMNet(**model_attributes(model))
  torch_model.load_state_dict(state_dict, strict=True)
  with torch.no_grad():
    report = check_parity(torch_model, variables, model, size=size, seed=seed)
  print('\n'.join(report.lines()))
  return report.passed


def run(args: argparse.Namespace) -> int:
  state_dict, variables, model = load_both(args.source, args.use_spa_att)
  print(describe(args.source, state_dict, variables, model))
  if args.command == 'torch2flax':
    print(f'wrote {save_variables(variables, args.destination, args.overwrite)}')
  else:
    print(f'wrote {save_state_dict(state_dict, args.destination, args.overwrite)}')
  if args.check_size and not report_parity(state_dict, variables, model, args.check_size,
                                           args.check_seed):
    return 1
  return 0


def main(argv: list[str] | None = None) -> int:
  return run_command('fsmnet-convert', _parser(), run, argv, USER_ERRORS)


if __name__ == '__main__':
  sys.exit(main())
