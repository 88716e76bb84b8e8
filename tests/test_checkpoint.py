"""Orbax checkpoints of a model's variables (fsmnet_jax.checkpoint): round trip, refusals, clear
errors. Needs no torch."""

import jax
import numpy as np
import pytest

from fsmnet_jax.checkpoint import CheckpointError, load_variables, save_variables
from fsmnet_jax.model import FSMNetTiny, init_variables


def test_flax_variables_round_trip_through_orbax(tmp_path):
  variables = init_variables(FSMNetTiny(), jax.random.key(0))
  directory = save_variables(variables, tmp_path / 'ckpt')
  restored = load_variables(directory)
  flat, flat_restored = (dict(jax.tree_util.tree_leaves_with_path(v)) for v in (variables, restored))
  assert flat.keys() == flat_restored.keys()
  for path, value in flat.items():
    np.testing.assert_array_equal(flat_restored[path], value)
    assert flat_restored[path].dtype == value.dtype
  with pytest.raises(FileExistsError):
    save_variables(variables, directory)
  # An empty folder (a container's volume, say) is filled, not refused or replaced.
  volume = tmp_path / 'volume'
  volume.mkdir()
  assert save_variables(variables, volume) == volume
  assert sorted(p.name for p in volume.iterdir()) == sorted(p.name for p in directory.iterdir())
  for value, again in zip(*map(jax.tree_util.tree_leaves, (restored, load_variables(volume)))):
    np.testing.assert_array_equal(again, value)
  with pytest.raises(CheckpointError, match='no such checkpoint folder'):
    load_variables(tmp_path / 'nothing')
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / '_METADATA').write_text('{not json')
  with pytest.raises(CheckpointError, match='broken: not a readable orbax checkpoint'):
    load_variables(broken)
