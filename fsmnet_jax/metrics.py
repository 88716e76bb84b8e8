"""PSNR, SSIM and NMSE as pure jnp functions, in two conventions.

`reference`: the reference repo de-normalises each slice, clips it to [0, 1], casts it to uint8
and calls scikit-image with its defaults (data range 255; SSIM with a 7x7 uniform window, K1
0.01, K2 0.03, sample covariance, the 3-pixel border left out of the mean). `to_uint8_scale`
does the first part (after `transforms.denormalize_images`); `psnr`, `ssim` and `nmse` the
second, per image, jittable; `reference_metrics` both.

`fastmri`: the fastMRI challenge scores whole volumes, with the data range the maximum of the
target volume: `volume_psnr`, `volume_ssim` (the mean of the slices' SSIM) and `volume_nmse`.
"""

import jax
import jax.numpy as jnp

UINT8_RANGE = 255.0
SSIM_WINDOW = 7
SSIM_K1, SSIM_K2 = 0.01, 0.03


def to_uint8_scale(image: jax.Array) -> jax.Array:
  """Intensities -> float images of uint8 values, as the reference's
  `(clip(image, 0, 1) * 255).astype(uint8)` (a cast, so truncation)."""
  return jnp.floor(jnp.clip(image, 0.0, 1.0) * UINT8_RANGE)


def psnr(target: jax.Array, prediction: jax.Array, data_range: float | jax.Array = UINT8_RANGE
         ) -> jax.Array:
  """Per-image PSNR in dB of (B, H, W) images (inf where they are equal, as scikit-image)."""
  mse = jnp.mean((target - prediction) ** 2, axis=(1, 2))
  return 10.0 * jnp.log10(data_range**2 / mse)


def nmse(target: jax.Array, prediction: jax.Array) -> jax.Array:
  """Per-image normalised MSE ||t - p||^2 / ||t||^2 of (B, H, W) images."""
  return jnp.sum((target - prediction) ** 2, axis=(1, 2)) / jnp.sum(target**2, axis=(1, 2))


def _window_mean(x: jax.Array) -> jax.Array:
  # Only windows that fit inside the image: exactly the ones scikit-image averages after
  # cropping its (window - 1) / 2 border, so its padding mode never matters.
  window = (1, SSIM_WINDOW, SSIM_WINDOW)
  return jax.lax.reduce_window(x, 0.0, jax.lax.add, window, (1, 1, 1), 'VALID') / SSIM_WINDOW**2


def ssim(target: jax.Array, prediction: jax.Array, data_range: float | jax.Array = UINT8_RANGE
         ) -> jax.Array:
  """Per-image SSIM of (B, H, W) images, as `skimage.metrics.structural_similarity` defaults."""
  target = target.astype(jnp.float32)
  prediction = prediction.astype(jnp.float32)
  # Second moments of centred values: float32 E[x^2] - E[x]^2 at x ~ 255 would cancel badly.
  centre = data_range / 2
  x, y = target - centre, prediction - centre
  mean_x, mean_y = _window_mean(x), _window_mean(y)
  num_pixels = SSIM_WINDOW**2
  sample = num_pixels / (num_pixels - 1)
  var_x = sample * (_window_mean(x * x) - mean_x**2)
  var_y = sample * (_window_mean(y * y) - mean_y**2)
  cov_xy = sample * (_window_mean(x * y) - mean_x * mean_y)
  mu_x, mu_y = mean_x + centre, mean_y + centre
  c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
  ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)
              / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2)))
  return jnp.mean(ssim_map, axis=(1, 2))


def reference_metrics(target: jax.Array, prediction: jax.Array) -> dict[str, jax.Array]:
  """Per-image PSNR, SSIM and NMSE of (B, H, W) intensities on the reference convention."""
  target, prediction = to_uint8_scale(target), to_uint8_scale(prediction)
  return {'psnr': psnr(target, prediction), 'ssim': ssim(target, prediction),
          'nmse': nmse(target, prediction)}


def volume_psnr(target: jax.Array, prediction: jax.Array) -> jax.Array:
  """PSNR of a (slices, H, W) volume as fastMRI: one MSE over the volume, range max(target)."""
  return psnr(_as_one_image(target), _as_one_image(prediction), jnp.max(target))[0]


def volume_ssim(target: jax.Array, prediction: jax.Array) -> jax.Array:
  """SSIM of a (slices, H, W) volume as fastMRI: mean over slices, data range max(target)."""
  return jnp.mean(ssim(target, prediction, jnp.max(target)))


def volume_nmse(target: jax.Array, prediction: jax.Array) -> jax.Array:
  """NMSE of a (slices, H, W) volume as fastMRI: ||t - p||^2 / ||t||^2 over the volume."""
  return nmse(_as_one_image(target), _as_one_image(prediction))[0]


def _as_one_image(volume: jax.Array) -> jax.Array:
  return volume.reshape(1, -1, volume.shape[-1])
