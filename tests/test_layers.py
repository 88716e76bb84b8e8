"""Tests for the primitive layers: PyTorch-style initialisation, pixel (un)shuffle, NaN guard."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsmnet_jax.layers import Conv2d, ConvAct, pixel_shuffle, pixel_unshuffle, replace_non_finite


@pytest.mark.parametrize('in_features,features,kernel_size,groups', [
    (64, 64, 3, 1), (128, 64, 3, 1), (256, 64, 1, 1), (128, 128, 3, 128)])
def test_conv_init_matches_torch_default(in_features, features, kernel_size, groups):
  x = jnp.zeros((1, 8, 8, in_features))
  params = Conv2d(features, kernel_size, groups=groups).init(jax.random.key(0), x)['params']
  fan_in = in_features // groups * kernel_size**2
  bound = 1 / math.sqrt(fan_in)
  kernel, bias = np.asarray(params['kernel']), np.asarray(params['bias'])
  assert kernel.shape == (kernel_size, kernel_size, in_features // groups, features)
  assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
  # U(-b, b) has standard deviation b / sqrt(3); thousands of draws pin it to a few percent.
  np.testing.assert_allclose(kernel.std(), bound / math.sqrt(3), rtol=0.05)
  np.testing.assert_allclose(kernel.mean(), 0, atol=0.05 * bound)


@pytest.mark.parametrize('features,groups', [(7, 1), (6, 6), (4, 2)])
def test_conv2d_is_the_convolution_plus_bias(features, groups):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 10, 6)), jnp.float32)
  layer = Conv2d(features, 3, groups=groups)
  variables = layer.init(jax.random.key(0), x)
  params = variables['params']
  expected = jax.lax.conv_general_dilated(
      x, params['kernel'], (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups) + params['bias']
  # (depthwise kernels may sum their nine products in another order: float32 rounding only)
  np.testing.assert_allclose(jax.jit(layer.apply)(variables, x), expected, atol=2e-6)


def test_conv_act_prelu_starts_at_quarter_slope():
  x = jnp.linspace(-2, 2, 8 * 8 * 4).reshape(1, 8, 8, 4)
  module = ConvAct(4, 3)
  variables = module.init(jax.random.key(0), x)
  assert set(variables['params']) == {'conv', 'prelu'}
  assert float(variables['params']['prelu']['negative_slope']) == 0.25
  assert 'bias' not in variables['params']['conv']
  y = module.apply(variables, x)
  pre = Conv2d(4, 3, use_bias=False).apply({'params': variables['params']['conv']}, x)
  np.testing.assert_allclose(y, np.where(pre >= 0, pre, 0.25 * pre), rtol=1e-6)


def test_pixel_unshuffle_channel_order_is_c_dy_dx():
  x = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
  y = np.asarray(pixel_unshuffle(jnp.asarray(x), 2))
  assert y.shape == (2, 2, 3, 12)
  for c in range(3):
    for dy in range(2):
      for dx in range(2):
        np.testing.assert_array_equal(y[..., c * 4 + dy * 2 + dx], x[:, dy::2, dx::2, c])
  np.testing.assert_array_equal(pixel_shuffle(jnp.asarray(y), 2), x)


def test_pixel_shuffle_matches_torch():
  torch = pytest.importorskip('torch')
  from torch_port.model import from_nhwc, to_nhwc  # pylint: disable=import-outside-toplevel
  x = np.random.default_rng(0).normal(size=(2, 5, 3, 16)).astype(np.float32)
  expected = torch.nn.functional.pixel_shuffle(from_nhwc(x), 2)
  np.testing.assert_array_equal(pixel_shuffle(jnp.asarray(x), 2),
                                to_nhwc(expected))
  # torch's own pixel_unshuffle uses the same (c, dy, dx) order as the reference's invPixelShuffle.
  y = np.random.default_rng(1).normal(size=(2, 6, 4, 3)).astype(np.float32)
  expected = torch.nn.functional.pixel_unshuffle(from_nhwc(y), 2)
  np.testing.assert_array_equal(pixel_unshuffle(jnp.asarray(y), 2),
                                to_nhwc(expected))


def test_replace_non_finite():
  x = jnp.array([1.0, jnp.nan, jnp.inf, -jnp.inf, -2.0])
  np.testing.assert_array_equal(replace_non_finite(x), np.float32([1.0, 1e-5, 1e-5, 1e-5, -2.0]))
