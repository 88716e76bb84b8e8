"""Sampling masks: bit-identical to the fastMRI package's, and at the nominal acceleration."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from fsmnet_jax.data import masks


def _fastmri_subsample():
  """fastMRI 0.3.0's mask module, loaded on its own: it needs only numpy and torch, while the
  package's __init__ pulls in its whole training stack."""
  pytest.importorskip('torch')
  spec = importlib.util.find_spec('fastmri')
  if spec is None:
    pytest.skip('fastmri not installed (scripts/test.sh installs fastmri==0.3.0 --no-deps)')
  path = Path(spec.submodule_search_locations[0]) / 'data' / 'subsample.py'
  module_spec = importlib.util.spec_from_file_location('fastmri_subsample', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


MASK_CLASSES = ['RandomMaskFunc', 'EquiSpacedMaskFunc', 'EquispacedMaskFractionFunc',
                'MagicMaskFunc', 'MagicMaskFractionFunc']
SHAPES = [(1, 320, 1), (15, 640, 368, 2), (1, 240, 1), (1, 257, 1), (2, 368, 1)]
SETTINGS = [([0.08], [4]), ([0.04], [8]), ([0.08, 0.04], [4, 8])]


@pytest.mark.parametrize('name', MASK_CLASSES)
@pytest.mark.parametrize('shape', SHAPES, ids=str)
@pytest.mark.parametrize('settings', SETTINGS, ids=str)
def test_bit_identical_to_fastmri(name, shape, settings):
  fastmri = _fastmri_subsample()
  center_fractions, accelerations = settings
  ours = getattr(masks, name)(center_fractions, accelerations, seed=123)
  theirs = getattr(fastmri, name)(center_fractions, accelerations, seed=123)
  calls = [dict(), dict(seed=7), dict(seed=(3, 1, 4)), dict(), dict(offset=1), dict(seed=7)]
  for kwargs in calls:  # the generator's state must evolve identically too
    mask, num_low = ours(shape, **kwargs)
    expected, expected_low = theirs(shape, **kwargs)
    assert isinstance(mask, np.ndarray) and mask.dtype == np.float32
    assert num_low == expected_low
    np.testing.assert_array_equal(mask, expected.numpy())


def test_any_combination_matches_fastmri():
  fastmri = _fastmri_subsample()
  ours = masks.RandomMaskFunc([0.08, 0.04], [4, 8, 12], allow_any_combination=True, seed=0)
  theirs = fastmri.RandomMaskFunc([0.08, 0.04], [4, 8, 12], allow_any_combination=True, seed=0)
  for _ in range(5):
    np.testing.assert_array_equal(ours((1, 320, 1))[0], theirs((1, 320, 1))[0].numpy())


# The masks FSMNet trains with; the magic masks round their spacing (as fastMRI's do, see the
# bit-identity test) and land up to ~7% off at some widths.
@pytest.mark.parametrize('name', ['RandomMaskFunc', 'EquispacedMaskFractionFunc'])
@pytest.mark.parametrize('acceleration,center_fraction', [(4, 0.08), (8, 0.04)])
def test_measured_acceleration_is_nominal(name, acceleration, center_fraction):
  mask_func = getattr(masks, name)([center_fraction], [acceleration], seed=0)
  sampled = np.mean([mask_func((1, 368, 1))[0].sum() for _ in range(200)])
  assert abs(368 / sampled / acceleration - 1) < 0.02


def test_seeded_calls_do_not_disturb_the_generator():
  a = masks.RandomMaskFunc([0.08], [4], seed=5)
  b = masks.RandomMaskFunc([0.08], [4], seed=5)
  a((1, 320, 1), seed=99)
  np.testing.assert_array_equal(a((1, 320, 1))[0], b((1, 320, 1))[0])
  np.testing.assert_array_equal(a((1, 320, 1), seed=99)[0], b((1, 320, 1), seed=99)[0])


def test_cartesian_mask_samples_whole_lines_along_the_axis():
  mask_func = masks.EquispacedMaskFractionFunc([0.08], [4])
  rows = masks.cartesian_mask(mask_func, (240, 200), axis=0, seed=1)
  cols = masks.cartesian_mask(mask_func, (240, 200), axis=1, seed=1)
  assert rows.shape == cols.shape == (240, 200)
  assert np.all(rows == rows[:, :1]) and np.all(cols == cols[:1, :])
  assert abs(rows.size / rows.sum() / 4 - 1) < 0.03 and abs(cols.size / cols.sum() / 4 - 1) < 0.03
  np.testing.assert_array_equal(rows, masks.cartesian_mask(mask_func, (240, 200), axis=0, seed=1))


@pytest.mark.parametrize('acceleration', [4, 8])
def test_gaussian_mask_is_exact_dense_centre_and_reproducible(acceleration):
  mask = masks.gaussian_mask((240, 240), acceleration, seed=3)
  assert mask.sum() == round(240 * 240 / acceleration)
  assert mask[110:129, 110:129].all()  # the centre square: round(0.08 * 240) = 19 px
  corners = mask[:40, :40].mean() + mask[-40:, -40:].mean()
  assert corners < mask.mean()  # density falls off away from the centre
  np.testing.assert_array_equal(mask, masks.gaussian_mask((240, 240), acceleration, seed=3))
  assert not np.array_equal(mask, masks.gaussian_mask((240, 240), acceleration, seed=4))


def test_unknown_mask_type():
  with pytest.raises(ValueError, match="unknown mask type 'radial'"):
    masks.create_mask_for_mask_type('radial', [0.08], [4])
  assert isinstance(masks.create_mask_for_mask_type('magic', [0.08], [4]), masks.MagicMaskFunc)


def test_poisson_disc_mask_spacing_density_and_reproducibility():
  mask = masks.poisson_disc_mask((96, 80), 4, seed=2)
  assert abs(mask.size / mask.sum() / 4 - 1) < 0.03
  centre = round(0.08 * 96), round(0.08 * 80)
  assert mask[(96 - centre[0]) // 2:(96 + centre[0]) // 2, (80 - centre[1]) // 2:(80 + centre[1]) // 2].all()
  assert mask[38:58, 30:50].mean() > mask[:15, :15].mean() + 0.1  # variable density
  # Outside the centre no two sampled points touch diagonally or directly at the edges,
  # where the disc radius is largest.
  edge = mask[:12, :]
  assert not np.any(edge[:, 1:] * edge[:, :-1]) and not np.any(edge[1:] * edge[:-1])
  np.testing.assert_array_equal(mask, masks.poisson_disc_mask((96, 80), 4, seed=2))
