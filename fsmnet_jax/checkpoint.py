"""Flax variables as a standalone orbax checkpoint (a converted or exported model)."""

import os
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

from fsmnet_jax.files import write_atomically


class CheckpointError(ValueError):
  """A checkpoint that cannot be read or does not hold what it should; names the file."""


def save_variables(variables: dict[str, Any], directory: str | os.PathLike,
                   overwrite: bool = False) -> Path:
  """Saves {'params': ...} to `directory` (refused if it exists, unless `overwrite`)."""
  variables = {'params': variables['params']}

  def write(path: Path) -> None:
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(path.absolute(), variables)

  return write_atomically(directory, write, overwrite)


def load_variables(directory: str | os.PathLike) -> dict[str, Any]:
  """Loads the {'params': ...} tree saved by `save_variables`, as numpy arrays."""
  directory = Path(directory)
  if not directory.is_dir():
    raise CheckpointError(f'{directory}: no such checkpoint folder')
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      restored = checkpointer.restore(directory.absolute())
  except Exception as e:  # orbax raises many types for damaged folders
    raise CheckpointError(f'{directory}: not a readable orbax checkpoint ({type(e).__name__}: '
                          f'{str(e).splitlines()[0][:200]})') from e
  if not isinstance(restored, dict) or 'params' not in restored:
    raise CheckpointError(f'{directory}: holds no "params" tree')
  return {'params': _to_numpy(restored['params'])}


def _to_numpy(tree):
  if isinstance(tree, dict):
    return {k: _to_numpy(v) for k, v in tree.items()}
  return np.asarray(tree)
