"""Centered orthonormal 2-D FFTs (numpy and jnp) and the zero-filled image of measured k-space.

Images are (..., H, W); k-space has its DC at the centre (fftshift convention of fastMRI).
"""

import jax.numpy as jnp
import numpy as np

from fsmnet_jax.data import transforms

SPATIAL_AXES = (-2, -1)


def fft2c(image: np.ndarray) -> np.ndarray:
  """Centered orthonormal 2-D FFT over the last two axes (numpy, complex)."""
  shifted = np.fft.ifftshift(image, axes=SPATIAL_AXES)
  return np.fft.fftshift(np.fft.fft2(shifted, axes=SPATIAL_AXES, norm='ortho'), axes=SPATIAL_AXES)


def ifft2c(kspace: np.ndarray) -> np.ndarray:
  """Inverse of `fft2c` (numpy, complex)."""
  shifted = np.fft.ifftshift(kspace, axes=SPATIAL_AXES)
  return np.fft.fftshift(np.fft.ifft2(shifted, axes=SPATIAL_AXES, norm='ortho'), axes=SPATIAL_AXES)


def fft2c_jnp(image: jnp.ndarray) -> jnp.ndarray:
  """`fft2c` in jnp, for use inside jitted code."""
  shifted = jnp.fft.ifftshift(image, axes=SPATIAL_AXES)
  return jnp.fft.fftshift(jnp.fft.fft2(shifted, axes=SPATIAL_AXES, norm='ortho'), axes=SPATIAL_AXES)


def ifft2c_jnp(kspace: jnp.ndarray) -> jnp.ndarray:
  """`ifft2c` in jnp, for use inside jitted code."""
  shifted = jnp.fft.ifftshift(kspace, axes=SPATIAL_AXES)
  return jnp.fft.fftshift(jnp.fft.ifft2(shifted, axes=SPATIAL_AXES, norm='ortho'),
                          axes=SPATIAL_AXES)


def zero_filled(kspace: np.ndarray, mask: np.ndarray | None = None,
                size: int | tuple[int, int] | None = None,
                coils: bool = False) -> np.ndarray:
  """|IFFT(mask * kspace)|: the zero-filled image of the measured samples (the fully-sampled
  image without `mask`), centre-cropped (or padded) to size x size (or to (rows, cols)) if
  given. Masks act on the measured, uncropped grid. With `coils`, axis -3 of `kspace` holds the
  receive coils, all masked alike, and their images are combined by root-sum-of-squares."""
  sampled = kspace if mask is None else kspace * mask
  image = np.abs(ifft2c(sampled))
  if coils:
    image = np.sqrt(np.sum(image ** 2, axis=-3))
  image = image.astype(np.float32)
  return image if size is None else transforms.fit_to_size(image, size)
