"""k-space helpers and normalisation: conventions, inverses, and the fastMRI FFT convention."""

import importlib.util
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from fsmnet_jax.data import kspace, masks, transforms


def _image(seed=0, shape=(2, 48, 40)):
  return np.random.default_rng(seed).random(shape)


def test_fft2c_is_unitary_centered_and_inverted():
  image = _image()
  k = kspace.fft2c(image)
  np.testing.assert_allclose(np.sum(np.abs(k) ** 2), np.sum(image ** 2), rtol=1e-12)
  np.testing.assert_allclose(k[:, 24, 20], image.sum(axis=(1, 2)) / np.sqrt(48 * 40), rtol=1e-12)
  np.testing.assert_allclose(kspace.ifft2c(k), image, atol=1e-12)
  np.testing.assert_allclose(kspace.fft2c_jnp(jnp.asarray(image, jnp.float32)), k, atol=1e-4)
  np.testing.assert_allclose(kspace.ifft2c_jnp(jnp.asarray(k, jnp.complex64)), image, atol=1e-5)


def test_fft2c_matches_fastmri():
  torch = pytest.importorskip('torch')
  spec = importlib.util.find_spec('fastmri')
  if spec is None:
    pytest.skip('fastmri not installed')
  path = Path(spec.submodule_search_locations[0]) / 'fftc.py'
  module_spec = importlib.util.spec_from_file_location('fastmri_fftc', path)
  fftc = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(fftc)
  image = _image(1, (45, 38))  # odd sizes: the shift conventions differ there if anywhere
  as_real = torch.from_numpy(np.stack([image, np.zeros_like(image)], axis=-1))
  theirs = fftc.fft2c_new(as_real).numpy()
  np.testing.assert_allclose(kspace.fft2c(image), theirs[..., 0] + 1j * theirs[..., 1],
                             atol=1e-12)


def test_undersampling():
  image = _image()[0]
  np.testing.assert_allclose(kspace.zero_filled(kspace.fft2c(image), np.ones_like(image)), image, atol=1e-6)
  mask = masks.cartesian_mask(masks.RandomMaskFunc([0.08], [4]), image.shape, axis=1, seed=0)
  zero_filled = kspace.zero_filled(kspace.fft2c(image), mask)
  assert zero_filled.dtype == np.float32 and zero_filled.shape == image.shape
  assert 0 < np.abs(zero_filled - image).mean() < image.mean()
  # Only lines along W were dropped: an image constant along W has all its energy in the
  # always-sampled DC column, so it comes back exactly.
  flat = np.repeat(image[:, :1], image.shape[1], axis=1)
  np.testing.assert_allclose(kspace.zero_filled(kspace.fft2c(flat), mask), flat, atol=1e-6)


def test_normalisation_is_the_references_and_invertible():
  rng = np.random.default_rng(0)
  target = rng.random((32, 32))
  target_under = target + 0.05 * rng.normal(size=target.shape)
  aux = 3 * rng.random((32, 32)) + 2
  example = transforms.normalize_example(target_under, target, aux)
  mean, std = target_under.mean(), target_under.std()
  np.testing.assert_allclose(example['target'], (target - mean) / (std + 1e-11), rtol=1e-5)
  np.testing.assert_allclose(example['aux'].mean(), 0, atol=1e-5)
  np.testing.assert_allclose(example['aux'].std(), 1, rtol=1e-5)
  np.testing.assert_allclose(
      transforms.denormalize(example['target'], example['mean'], example['std']), target, atol=1e-5)
  spiky = target.copy()
  spiky[0, 0] = 1e3
  assert transforms.normalize_example(spiky, spiky, aux)['target_under'].max() == 6.0
  assert all(v.dtype == np.float32 for v in example.values())
