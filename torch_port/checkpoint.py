"""Reading reference PyTorch checkpoints safely (as Flax parameters too), and writing `.pth` /
`.safetensors`."""

import collections
import os
import pickle
from pathlib import Path
from typing import Any, Mapping

import torch

from fsmnet_jax import inference
from fsmnet_jax.checkpoint import CheckpointError
from fsmnet_jax.files import write_atomically
from fsmnet_jax.model import FSMNet
from torch_port import convert

# Where training scripts commonly nest the state_dict inside a saved dict.
NESTING_KEYS = ('network', 'state_dict', 'model', 'model_state_dict', 'net', 'params')
DATA_PARALLEL_PREFIX = 'module.'


def load_state_dict(path: str | os.PathLike) -> 'collections.OrderedDict[str, torch.Tensor]':
  """The state_dict in a `.pth`/`.pt` (bare, or nested under a common key, with or without
  DataParallel's `module.` prefix) or `.safetensors` file. Never unpickles code."""
  path = Path(path)
  if not path.is_file():
    raise CheckpointError(f'{path}: no such file')
  if not path.stat().st_size:
    raise CheckpointError(f'{path}: empty file (0 bytes)')
  if path.suffix == '.safetensors':
    import safetensors.torch  # pylint: disable=import-outside-toplevel
    try:
      loaded = safetensors.torch.load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for damaged files
      raise CheckpointError(f'{path}: not a readable safetensors file ({e})') from e
  else:
    try:
      loaded = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
      if not _is_zip_or_pickle(path):
        raise CheckpointError(f'{path}: not a readable PyTorch checkpoint (neither torch.save\'s '
                              f'zip format nor a pickle): truncated or corrupt?') from e
      # torch's message opens with advice to load unsafely; the line after says what stopped it.
      lines = [line.strip() for line in str(e).splitlines() if line.strip()]
      raise CheckpointError(
          f'{path}: refused: it holds Python objects other than tensors, which could run code '
          f'when unpickled (loaded with weights_only=True). Re-save it as a plain state_dict. '
          f'({lines[1][:160] if len(lines) > 1 else ""})') from e
    except Exception as e:  # torch raises many types for damaged files
      # torch's reasons run to paragraphs of advice; the first sentence says what failed.
      raise CheckpointError(f'{path}: not a readable PyTorch checkpoint (truncated or corrupt?): '
                            f'{str(e).splitlines()[0].split(". ")[0][:200]}') from e
  return _state_dict_from(loaded, path)


def load_params(path: str | os.PathLike, model: FSMNet | None = None, use_spa_att: bool = False
                ) -> tuple[dict[str, Any], FSMNet]:
  """(Flax params, model) of a reference PyTorch checkpoint file, converted; checked as
  `fsmnet_jax.inference.load_params` checks orbax checkpoints."""
  path = Path(path)
  state_dict = load_state_dict(path)
  try:
    variables = convert.torch_to_flax(state_dict, model)
  except convert.ConversionError as e:
    raise CheckpointError(f'{path}: {e}') from e
  return inference.check_params(path, variables['params'], model, use_spa_att)


def _is_zip_or_pickle(path: Path) -> bool:
  """torch.save writes a zip (b'PK'); older files are a bare pickle (protocol 2+ opens with
  the PROTO opcode, b'\\x80')."""
  with open(path, 'rb') as f:
    head = f.read(2)
  return head == b'PK' or head[:1] == b'\x80'


def _state_dict_from(loaded, path: Path) -> 'collections.OrderedDict[str, torch.Tensor]':
  if isinstance(loaded, Mapping) and not all(torch.is_tensor(v) for v in loaded.values()):
    nested = [k for k in NESTING_KEYS if isinstance(loaded.get(k), Mapping)]
    if not nested:
      raise CheckpointError(f'{path}: not a state_dict: a dict with keys {list(loaded)[:8]} and '
                            f'none of {NESTING_KEYS} holding one')
    loaded = loaded[nested[0]]
  if not isinstance(loaded, Mapping) or not loaded:
    raise CheckpointError(f'{path}: not a state_dict (holds a {type(loaded).__name__})')
  not_tensors = [k for k, v in loaded.items() if not torch.is_tensor(v)]
  if not_tensors:
    raise CheckpointError(f'{path}: not a state_dict: non-tensor entries {not_tensors[:8]}')
  return collections.OrderedDict(
      (k[len(DATA_PARALLEL_PREFIX):] if k.startswith(DATA_PARALLEL_PREFIX) else k, v)
      for k, v in loaded.items())


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                    overwrite: bool = False) -> Path:
  """Writes a bare state_dict as `.pth` (torch.save) or `.safetensors`, by the file suffix."""
  path = Path(path)
  if path.suffix not in ('.pth', '.pt', '.safetensors'):
    raise ValueError(f'{path}: unknown checkpoint type; use .pth, .pt or .safetensors')

  def write(temporary: Path) -> None:
    tensors = {k: v.contiguous() for k, v in state_dict.items()}
    if path.suffix == '.safetensors':
      import safetensors.torch  # pylint: disable=import-outside-toplevel
      safetensors.torch.save_file(tensors, str(temporary))
    else:
      torch.save(collections.OrderedDict(tensors), temporary)

  return write_atomically(path, write, overwrite)
