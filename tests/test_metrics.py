"""PSNR/SSIM/NMSE: the reference convention against scikit-image, the fastMRI one against its
formulas."""

import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from fsmnet_jax import metrics
from fsmnet_jax.data import transforms


def _uint8_pair(seed: int, size: int = 48) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  rows, cols = np.mgrid[:size, :size] / size
  target = 0.5 + 0.4 * np.sin(6 * rows) * np.cos(4 * cols)
  noisy = target + rng.normal(0, 0.05 * (seed + 1), target.shape)
  to_uint8 = lambda x: (np.clip(x, 0, 1) * 255).astype(np.uint8)
  return to_uint8(target), to_uint8(noisy)


def test_to_uint8_scale_is_the_references_cast():
  rng = np.random.default_rng(0)
  x = rng.normal(0, 2, (2, 8, 8, 1)).astype(np.float32)
  mean, std = np.float32([0.3, 0.5]), np.float32([0.2, 0.1])
  expected = (np.clip(x[..., 0] * std[:, None, None] + mean[:, None, None], 0, 1) * 255
              ).astype(np.uint8)
  image = transforms.denormalize_images(x, mean, std)
  np.testing.assert_array_equal(metrics.to_uint8_scale(image), expected)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_psnr_ssim_nmse_match_scikit_image(seed):
  target, noisy = _uint8_pair(seed)
  batch = lambda a: a[None].astype(np.float32)
  # float32 in jnp vs float64 in scikit-image: measured relative differences <= 3e-7.
  np.testing.assert_allclose(metrics.psnr(batch(target), batch(noisy))[0],
                             peak_signal_noise_ratio(target, noisy), rtol=1e-6)
  np.testing.assert_allclose(metrics.ssim(batch(target), batch(noisy))[0],
                             structural_similarity(target, noisy), rtol=1e-5, atol=1e-6)
  t, p = target.astype(np.float64), noisy.astype(np.float64)
  np.testing.assert_allclose(metrics.nmse(batch(target), batch(noisy))[0],
                             np.sum((t - p) ** 2) / np.sum(t**2), rtol=1e-5)


def test_identical_images_give_ssim_one_and_infinite_psnr():
  target, _ = _uint8_pair(0)
  x = target[None].astype(np.float32)
  assert metrics.ssim(x, x)[0] == pytest.approx(1.0, abs=1e-6)
  assert np.isinf(metrics.psnr(x, x)[0])


def test_volume_metrics_follow_fastmri():
  rng = np.random.default_rng(3)
  rows, cols = np.mgrid[:40, :48] / 40
  target = np.stack([(1 + k) * np.exp(-((rows - 0.5) ** 2 + (cols - 0.6) ** 2) * (4 + k))
                     for k in range(3)]).astype(np.float32)
  prediction = (target + rng.normal(0, 0.03, target.shape)).astype(np.float32)
  t, p = target.astype(np.float64), prediction.astype(np.float64)
  # fastMRI's evaluate.py: skimage PSNR/SSIM with data_range = gt.max() of the whole volume.
  # Measured relative differences: PSNR 7e-9, SSIM 2.3e-7, NMSE 8.7e-8.
  expected_psnr = 10 * np.log10(t.max() ** 2 / np.mean((t - p) ** 2))
  expected_ssim = np.mean([structural_similarity(t[i], p[i], data_range=t.max())
                           for i in range(len(t))])
  expected_nmse = np.linalg.norm(t - p) ** 2 / np.linalg.norm(t) ** 2
  np.testing.assert_allclose(metrics.volume_psnr(target, prediction), expected_psnr, rtol=1e-6)
  np.testing.assert_allclose(metrics.volume_ssim(target, prediction), expected_ssim, rtol=1e-5)
  np.testing.assert_allclose(metrics.volume_nmse(target, prediction), expected_nmse, rtol=1e-5)
