"""Fourier helpers shared by the frequency blocks and the losses: amplitude and phase of rfft2."""

import jax
import jax.numpy as jnp

# NHWC images and feature maps transform over their spatial axes; rfft runs along W, as
# torch.fft.rfft2 does on the last axis of an NCHW tensor.
SPATIAL_AXES = (1, 2)


def safe_angle(z: jax.Array) -> jax.Array:
  """`jnp.angle` with a zero gradient at z == 0 instead of NaN (PyTorch's convention).

  The value is `atan2(imag, real)` everywhere, signed zeros included, so that phase jumps
  between -pi and +pi happen exactly where the reference's `torch.angle` has them.
  """
  return _phase(jnp.real(z), jnp.imag(z))


@jax.custom_jvp
def _phase(re: jax.Array, im: jax.Array) -> jax.Array:
  return jnp.arctan2(im, re)


@_phase.defjvp
def _phase_jvp(primals, tangents):
  # One arctan2 for the value: it is the frequency blocks' costliest element-wise op on CPU,
  # and guarding the origin inside arctan2's own derivative would need a second one. The
  # derivative is arctan2's (im' re - re' im) / (re^2 + im^2), with 0 where both are 0.
  re, im = primals
  re_dot, im_dot = tangents
  at_origin = (re == 0) & (im == 0)
  safe_norm = jnp.where(at_origin, 1.0, jnp.square(im) + jnp.square(re))
  derivative = im_dot * (re / safe_norm) + re_dot * (-im / safe_norm)
  return jnp.arctan2(im, re), jnp.where(at_origin, 0.0, derivative)


def amplitude_phase(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Amplitude and phase of the unnormalised ("backward") rfft2 of a real NHWC array, in at
  least float32 whatever the input's precision: the phase is too sensitive for bfloat16."""
  at_least_float32 = jnp.promote_types(x.dtype, jnp.float32)
  spectrum = jnp.fft.rfft2(x.astype(at_least_float32), axes=SPATIAL_AXES)
  return jnp.abs(spectrum), safe_angle(spectrum)


def inverse_amplitude_phase(real: jax.Array, imag: jax.Array, height: int, width: int) -> jax.Array:
  """Real NHWC image of size (height, width) whose rfft2 is `real + i imag`."""
  return jnp.fft.irfft2(jax.lax.complex(real, imag), s=(height, width), axes=SPATIAL_AXES)
