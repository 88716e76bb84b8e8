"""Fourier helpers shared by the frequency blocks and the losses: amplitude and phase of rfft2."""

import decimal

import jax
import jax.numpy as jnp
import numpy as np

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
  return arctan2(im, re)


@_phase.defjvp
def _phase_jvp(primals, tangents):
  # One arctan2 for the value: guarding the origin inside arctan2's own derivative would need a
  # second one. The
  # derivative is arctan2's (im' re - re' im) / (re^2 + im^2), with 0 where both are 0.
  re, im = primals
  re_dot, im_dot = tangents
  at_origin = (re == 0) & (im == 0)
  safe_norm = jnp.where(at_origin, 1.0, jnp.square(im) + jnp.square(re))
  derivative = im_dot * (re / safe_norm) + re_dot * (-im / safe_norm)
  return arctan2(im, re), jnp.where(at_origin, 0.0, derivative)


def amplitude_phase(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Amplitude and phase of the unnormalised ("backward") rfft2 of a real NHWC array, in at
  least float32 whatever the input's precision: the phase is too sensitive for bfloat16."""
  at_least_float32 = jnp.promote_types(x.dtype, jnp.float32)
  spectrum = jnp.fft.rfft2(x.astype(at_least_float32), axes=SPATIAL_AXES)
  return jnp.abs(spectrum), safe_angle(spectrum)


def inverse_amplitude_phase(real: jax.Array, imag: jax.Array, height: int, width: int) -> jax.Array:
  """Real NHWC image of size (height, width) whose rfft2 is `real + i imag`."""
  return jnp.fft.irfft2(jax.lax.complex(real, imag), s=(height, width), axes=SPATIAL_AXES)


# XLA:CPU computes atan2, sin and cos one element at a time through the C library: 20 ms and
# 6 ms each for a 240 px spectrum of 64 channels, a tenth of the forward pass. The element-wise
# forms below vectorise (11x and 8x faster) and stay within 1 ulp. Where one more rounding would
# cost more than half an ulp, a sum or a product is carried with its rounding error
# ("double-float": hi + lo).


def _two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """a + b and its rounding error (Knuth's two-sum, any magnitudes)."""
  total = a + b
  b_part = total - a
  return total, (a - (total - b_part)) + (b - b_part)


def _fast_two_sum(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """a + b and its rounding error, for |a| >= |b|."""
  total = a + b
  return total, b - (total - a)


def _two_prod(a: jax.Array, b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """a * b and its rounding error (Dekker's product: each factor split in 12-bit halves)."""
  def halves(v):
    scaled = 4097.0 * v
    high = scaled - (scaled - v)
    return high, v - high
  product = a * b
  (a_hi, a_lo), (b_hi, b_lo) = halves(a), halves(b)
  return product, ((a_hi * b_hi - product) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo


def _float32_pair(value: str) -> tuple[float, float]:
  """A decimal constant as float32 hi + lo."""
  exact = decimal.Decimal(value)
  high = np.float32(float(exact))
  return float(high), float(np.float32(float(exact - decimal.Decimal(float(high)))))


_PI = '3.14159265358979323846264338327950288419716939937510582097494'
_PI_HI, _PI_LO = _float32_pair(_PI)
_HALF_PI_HI, _HALF_PI_LO = _float32_pair(str(decimal.Decimal(_PI) / 2))
_QUARTER_PI_HI, _QUARTER_PI_LO = _float32_pair(str(decimal.Decimal(_PI) / 4))
_TAN_EIGHTH_PI = 0.41421356237309503


def arctan2(y: jax.Array, x: jax.Array) -> jax.Array:
  """`jnp.arctan2`; in float32 within 1 ulp (XLA:CPU's own: 1.44), special values (signed
  zeros, infinities, NaN) as IEEE 754 has them. Other precisions (float64 parity checks) are
  XLA's."""
  if jnp.result_type(y, x) != jnp.float32:
    return jnp.arctan2(y, x)
  abs_x, abs_y = jnp.abs(x), jnp.abs(y)
  swapped = abs_y > abs_x
  small, large = jnp.minimum(abs_x, abs_y), jnp.maximum(abs_x, abs_y)
  # atan(small / large) in [0, pi/4]; ratios of infinities and zeros by their limits.
  both_infinite = jnp.isinf(small)
  small = jnp.where(both_infinite, 1.0, jnp.where(jnp.isinf(large), 0.0, small))
  large = jnp.where(both_infinite | jnp.isinf(large) | (large == 0), 1.0, large)
  # Powers of two keep the ratio exact and Dekker's products clear of overflow.
  scale = jnp.where(large > 2.0**60, 2.0**-64, jnp.where(large < 2.0**-60, 2.0**64, 1.0))
  small, large = small * scale, large * scale
  # Above tan(pi/8): atan(r) = pi/4 + atan((r - 1) / (r + 1)), (r - 1) / (r + 1) in double-float.
  reduced = small > _TAN_EIGHTH_PI * large
  difference, difference_error = _two_sum(small, -large)
  total, total_error = _two_sum(small, large)
  numerator = jnp.where(reduced, difference, small)
  numerator_error = jnp.where(reduced, difference_error, 0.0)
  denominator = jnp.where(reduced, total, large)
  denominator_error = jnp.where(reduced, total_error, 0.0)
  u = numerator / denominator
  product, product_error = _two_prod(u, denominator)
  u_error = (((numerator - product) - product_error) + numerator_error
             - u * denominator_error) / denominator
  # atan(u) - u on |u| <= tan(pi/8): u^3 times a degree-4 polynomial in u^2 (a Chebyshev fit,
  # 0.04 ulp from atan in exact arithmetic; Cephes' degree 3 is 1 ulp off).
  z = u * u
  odd_terms = (((((-0.0645918920636177 * z + 0.10746244341135025) * z - 0.14264227449893951) * z
                 + 0.1999955028295517) * z - 0.3333333134651184) * z * u)
  base_hi = jnp.where(reduced, _QUARTER_PI_HI, 0.0)
  angle, angle_error = _fast_two_sum(base_hi, u)
  angle_error += jnp.where(reduced, _QUARTER_PI_LO, 0.0) + u_error + odd_terms
  # Octants: pi/2 - angle above the diagonal, pi - angle for x < 0 (signed zeros included).
  for flip, hi, lo in ((swapped, _HALF_PI_HI, _HALF_PI_LO), (jnp.signbit(x), _PI_HI, _PI_LO)):
    angle, error = _fast_two_sum(jnp.where(flip, hi, 0.0), jnp.where(flip, -angle, angle))
    angle_error = error + (jnp.where(flip, lo, 0.0) + jnp.where(flip, -angle_error, angle_error))
  result = angle + angle_error
  return jnp.where(jnp.signbit(y), -result, result)


# Cody-Waite reduction by multiples of pi/4: its first two parts multiply exactly (Cephes' DP1,
# DP2 for |x| below ~3000), the third is split in two so that its product's rounding is kept.
_QUARTER_PI_PARTS = (0.78515625, 0.00024187564849853516, 3.7747668102383614e-08,
                     1.2816720341285448e-12)


@jax.custom_jvp
def cos_sin(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(cos x, sin x); in float32 within 1 ulp for |x| up to ~3000 (beyond, the reduction loses
  precision), NaN for infinite x. Other precisions are XLA's."""
  if x.dtype != jnp.float32:
    return jnp.cos(x), jnp.sin(x)
  abs_x = jnp.abs(x)
  octant = (abs_x * (4 / np.pi)).astype(jnp.int32)
  octant = (octant + 1) & ~1  # the nearest multiple of pi/2, in units of pi/4
  multiple = octant.astype(x.dtype)
  part_1, part_2, part_3, part_4 = _QUARTER_PI_PARTS
  r, r_error = _two_sum((abs_x - multiple * part_1) - multiple * part_2, -multiple * part_3)
  r, error = _two_sum(r, -multiple * part_4)
  r, r_error = _fast_two_sum(r, r_error + error)  # x - multiple * pi/4 = r + r_error
  z = r * r
  # Cephes' sinf and cosf polynomials; cos as 1 - z/2 with the rounding of that kept (fdlibm).
  sine = r + (r_error + r * z * ((-1.9515295891e-4 * z + 8.3321608736e-3) * z
                                 - 1.6666654611e-1))
  half_z = 0.5 * z
  one_minus = 1.0 - half_z
  cosine = one_minus + (((1.0 - one_minus) - half_z)
                        + (z * z * ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z
                                    + 4.166664568298827e-2) - r * r_error))
  quadrant = octant >> 1
  odd = (quadrant & 1) == 1
  sine, cosine = jnp.where(odd, cosine, sine), jnp.where(odd, sine, cosine)
  sine = jnp.where(((quadrant & 2) == 2) != jnp.signbit(x), -sine, sine)
  cosine = jnp.where(((quadrant + 1) & 2) == 2, -cosine, cosine)
  finite = jnp.isfinite(x)
  return jnp.where(finite, cosine, jnp.nan), jnp.where(finite, sine, jnp.nan)


@cos_sin.defjvp
def _cos_sin_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  cosine, sine = cos_sin(x)
  return (cosine, sine), (-sine * x_dot, cosine * x_dot)
