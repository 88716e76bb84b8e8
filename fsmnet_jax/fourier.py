"""Fourier helpers shared by the frequency blocks and the losses: amplitude and phase of rfft2."""

import jax
import jax.numpy as jnp

# NHWC images and feature maps transform over their spatial axes; rfft runs along W, as
# torch.fft.rfft2 does on the last axis of an NCHW tensor.
SPATIAL_AXES = (1, 2)


def safe_angle(z: jax.Array) -> jax.Array:
  """`jnp.angle` with a zero gradient at z == 0 instead of NaN (PyTorch's convention).

  The forward value is `atan2(imag, real)` everywhere, signed zeros included, so that phase
  jumps between -pi and +pi happen exactly where the reference's `torch.angle` has them.
  """
  re, im = jnp.real(z), jnp.imag(z)
  at_origin = (re == 0) & (im == 0)
  differentiable = jnp.arctan2(jnp.where(at_origin, 0.0, im), jnp.where(at_origin, 1.0, re))
  return jnp.where(at_origin, jax.lax.stop_gradient(jnp.arctan2(im, re)), differentiable)


def amplitude_phase(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Amplitude and phase of the unnormalised ("backward") rfft2 of a real NHWC array, in at
  least float32 whatever the input's precision: the phase is too sensitive for bfloat16."""
  at_least_float32 = jnp.promote_types(x.dtype, jnp.float32)
  spectrum = jnp.fft.rfft2(x.astype(at_least_float32), axes=SPATIAL_AXES)
  return jnp.abs(spectrum), safe_angle(spectrum)


def inverse_amplitude_phase(real: jax.Array, imag: jax.Array, height: int, width: int) -> jax.Array:
  """Real NHWC image of size (height, width) whose rfft2 is `real + i imag`."""
  return jnp.fft.irfft2(jax.lax.complex(real, imag), s=(height, width), axes=SPATIAL_AXES)
