"""Centered orthonormal 2-D FFTs (numpy and jnp) and zero-filled undersampling of images.

Images are (..., H, W); k-space has its DC at the centre (fftshift convention of fastMRI).
"""

import jax.numpy as jnp
import numpy as np

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


def to_complex(real_imag: np.ndarray) -> np.ndarray:
  """Complex array from fastMRI's real layout (..., 2) holding (real, imaginary)."""
  if real_imag.shape[-1] != 2:
    raise ValueError(f'expected a last axis of 2 (real, imaginary); got shape {real_imag.shape}')
  return real_imag[..., 0] + 1j * real_imag[..., 1]


def to_real_imag(values: np.ndarray) -> np.ndarray:
  """fastMRI's real layout (..., 2) of a complex array."""
  return np.stack([values.real, values.imag], axis=-1)


def zero_filled(kspace: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """Magnitude image of the masked k-space (unmeasured entries set to zero)."""
  return np.abs(ifft2c(kspace * mask)).astype(np.float32)


def undersample(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """|IFFT(mask * FFT(image))|: the zero-filled image a scan measuring only `mask` would give."""
  return zero_filled(fft2c(image), mask)
