"""Tests for the Fourier helpers: reference-exact phase values, finite gradients at zero."""

import jax
import jax.numpy as jnp
import numpy as np

from fsmnet_jax import fourier


def test_safe_angle_equals_angle_including_signed_zeros():
  values = [1 + 1j, complex(-1.0, 0.0), complex(-1.0, -0.0), 0 + 0j, -0.0 + 0j, complex(0.0, -0.0), complex(-0.0, -0.0),
            -39.23 - 1.9e-6j, 3 - 4j]
  z = jnp.array(values, jnp.complex64)
  np.testing.assert_allclose(fourier.safe_angle(z), jnp.angle(z), rtol=2**-23)
  np.testing.assert_array_equal(np.signbit(fourier.safe_angle(z)), np.signbit(jnp.angle(z)))
  # The +-pi branch cut is where rounding noise is amplified; it must sit where torch.angle's does.
  np.testing.assert_allclose(fourier.safe_angle(z[1:3]), [np.pi, -np.pi], rtol=1e-7)


def _ulps(value: jax.Array, exact: np.ndarray) -> np.ndarray:
  """|value - exact| in units of the last place of exact rounded to float32."""
  spacing = np.spacing(np.abs(exact.astype(np.float32))).astype(np.float64)
  return np.abs(np.asarray(value, np.float64) - exact) / spacing


def test_arctan2_is_within_one_ulp_with_ieee_special_values():
  rng = np.random.default_rng(0)
  n = 1_000_000
  # Magnitudes over 17 decades each, ratios near tan(pi/8) and 1 included.
  y = (rng.standard_normal(n) * np.exp(rng.uniform(-20, 20, n))).astype(np.float32)
  x = (rng.standard_normal(n) * np.exp(rng.uniform(-20, 20, n))).astype(np.float32)
  ratios = rng.uniform(0.40, 0.43, n // 4).astype(np.float32)
  extremes = np.array([3e38, -2e38, 1e-30, -3e-35], np.float32)
  y = np.concatenate([y, ratios * 3.7, -ratios, extremes, extremes[::-1] * 0.7])
  x = np.concatenate([x, np.full_like(ratios, -3.7), np.ones_like(ratios), extremes * 0.9,
                      extremes])
  exact = np.arctan2(y.astype(np.float64), x.astype(np.float64))
  ulps = _ulps(jax.jit(fourier.arctan2)(y, x), exact)
  assert ulps.max() < 1.0
  # Zeros, infinities and NaN: IEEE 754's values, correctly rounded to float32.
  special = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan], np.float32)
  y, x = (grid.ravel() for grid in np.meshgrid(special, special))
  expected = np.arctan2(y.astype(np.float64), x.astype(np.float64)).astype(np.float32)
  np.testing.assert_array_equal(fourier.arctan2(y, x), expected)
  number = ~np.isnan(expected)
  np.testing.assert_array_equal(np.signbit(fourier.arctan2(y, x))[number],
                                np.signbit(expected)[number])


def test_cos_sin_are_within_one_ulp_below_3000():
  rng = np.random.default_rng(1)
  x = np.concatenate([rng.uniform(-20, 20, 1_000_000), rng.uniform(-3000, 3000, 1_000_000),
                      rng.uniform(-1, 1, 100_000) * 1e-3,
                      np.float32(np.pi / 2) * np.arange(-1900, 1900)]).astype(np.float32)
  cosine, sine = jax.jit(fourier.cos_sin)(x)
  exact = x.astype(np.float64)
  assert _ulps(cosine, np.cos(exact)).max() < 1.0 and _ulps(sine, np.sin(exact)).max() < 1.0
  special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan], np.float32)
  cosine, sine = fourier.cos_sin(special)
  np.testing.assert_array_equal(cosine, [1, 1, np.nan, np.nan, np.nan])
  np.testing.assert_array_equal(sine, [0, -0.0, np.nan, np.nan, np.nan])
  assert np.signbit(sine[1]) and not np.signbit(sine[0])
  # The derivatives are the exact ones, from the values: d cos = -sin, d sin = cos.
  grads = jax.grad(lambda v: jnp.sum(fourier.cos_sin(v)[0] + 2 * fourier.cos_sin(v)[1]))(x[:8])
  np.testing.assert_allclose(grads, -np.sin(x[:8]) + 2 * np.cos(x[:8]), rtol=1e-6, atol=1e-6)


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
