"""Tests for the Fourier helpers: reference-exact phase values, finite gradients at zero."""

import jax
import jax.numpy as jnp
import numpy as np

from fsmnet_jax import fourier


def test_safe_angle_equals_angle_including_signed_zeros():
  values = [1 + 1j, complex(-1.0, 0.0), complex(-1.0, -0.0), 0 + 0j, -0.0 + 0j, complex(0.0, -0.0), complex(-0.0, -0.0),
            -39.23 - 1.9e-6j, 3 - 4j]
  z = jnp.array(values, jnp.complex64)
  np.testing.assert_array_equal(fourier.safe_angle(z), jnp.angle(z))
  # The +-pi branch cut is where rounding noise is amplified; it must sit where torch.angle's does.
  np.testing.assert_allclose(fourier.safe_angle(z[1:3]), [np.pi, -np.pi], rtol=1e-7)


def test_safe_angle_gradient():
  def total(re, im, angle_fn):
    return jnp.sum(angle_fn(jax.lax.complex(re, im)))

  re, im = jnp.array([0.0, 1.0, -2.0, 0.5]), jnp.array([0.0, 1.0, 0.5, -3.0])
  safe = jax.grad(total, argnums=(0, 1))(re, im, fourier.safe_angle)
  plain = jax.grad(total, argnums=(0, 1))(re, im, jnp.angle)
  assert np.isnan(plain[0][0])  # the reason safe_angle exists
  for g_safe, g_plain in zip(safe, plain):
    assert g_safe[0] == 0
    np.testing.assert_allclose(g_safe[1:], g_plain[1:], rtol=1e-6)


def test_amplitude_phase_round_trip():
  x = jax.random.normal(jax.random.key(0), (2, 12, 10, 3))
  amp, pha = fourier.amplitude_phase(x)
  assert amp.shape == pha.shape == (2, 12, 6, 3)  # rfft along W, the second spatial axis
  np.testing.assert_allclose(amp, np.abs(np.fft.rfft2(np.asarray(x), axes=(1, 2))), rtol=1e-5, atol=1e-5)
  back = fourier.inverse_amplitude_phase(amp * jnp.cos(pha), amp * jnp.sin(pha), 12, 10)
  np.testing.assert_allclose(back, x, atol=1e-5)
