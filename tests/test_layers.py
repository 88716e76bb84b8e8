"""Tests for the primitive layers: PyTorch-style initialisation, pixel (un)shuffle, NaN guard."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsmnet_jax.layers import (Conv2d, ConvAct, conv_with_explicit_gradients,
                               depthwise_by_shifts, pixel_shuffle, pixel_unshuffle,
                               replace_non_finite)


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
  x = np.random.default_rng(0).normal(size=(2, 5, 3, 16)).astype(np.float32)
  expected = torch.nn.functional.pixel_shuffle(torch.from_numpy(x.transpose(0, 3, 1, 2)), 2)
  np.testing.assert_array_equal(pixel_shuffle(jnp.asarray(x), 2),
                                expected.numpy().transpose(0, 2, 3, 1))
  # torch's own pixel_unshuffle uses the same (c, dy, dx) order as the reference's invPixelShuffle.
  y = np.random.default_rng(1).normal(size=(2, 6, 4, 3)).astype(np.float32)
  expected = torch.nn.functional.pixel_unshuffle(torch.from_numpy(y.transpose(0, 3, 1, 2)), 2)
  np.testing.assert_array_equal(pixel_unshuffle(jnp.asarray(y), 2),
                                expected.numpy().transpose(0, 2, 3, 1))


def test_replace_non_finite():
  x = jnp.array([1.0, jnp.nan, jnp.inf, -jnp.inf, -2.0])
  np.testing.assert_array_equal(replace_non_finite(x), np.float32([1.0, 1e-5, 1e-5, 1e-5, -2.0]))


def test_depthwise_by_shifts_is_the_grouped_convolution():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 12, 10, 6)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 1, 6)), jnp.float32)
  grouped = lambda x, k: jax.lax.conv_general_dilated(
      x, k, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=6)
  # Nine products summed in another order: float32 rounding only (measured <= 1e-6).
  np.testing.assert_allclose(depthwise_by_shifts(x, kernel), grouped(x, kernel), atol=2e-6)
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
  for ours, theirs in zip(jax.grad(loss(depthwise_by_shifts), (0, 1))(x, kernel),
                          jax.grad(loss(grouped), (0, 1))(x, kernel)):
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)  # measured 4.4e-7 relative
  # Conv2d takes this path for depthwise kernels on CPU.
  layer = Conv2d(6, 3, use_bias=False, groups=6)
  variables = layer.init(jax.random.key(0), x)
  np.testing.assert_allclose(jax.jit(layer.apply)(variables, x),
                             grouped(x, variables['params']['kernel']), atol=2e-6)


def _plain_convolution(x, kernel):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@pytest.mark.parametrize('kernel_size', [1, 3])
@pytest.mark.parametrize('per_sample', [False, True])
def test_explicit_gradients_are_the_convolution_gradients(kernel_size, per_sample):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 12, 10, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 5, 7)), jnp.float32)
  explicit = lambda x, k: conv_with_explicit_gradients(x, k, per_sample)
  np.testing.assert_array_equal(explicit(x, kernel), _plain_convolution(x, kernel))
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
  (dx, dk), (plain_dx, plain_dk) = (jax.grad(loss(f), (0, 1))(x, kernel)
                                    for f in (explicit, _plain_convolution))
  # Sums in another order than XLA's own gradients (measured: at most 2.9e-7 of the largest).
  for ours, theirs in ((dx, plain_dx), (dk, plain_dk)):
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(theirs))))


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='the layout of XLA:CPU kernels')
def test_conv2d_gradients_in_a_loop_are_plain_nhwc_convolutions():
  """Gradient accumulation scans over micro-batches; inside the loop XLA:CPU does not rewrite
  its own gradient convolutions into the layout of its fast kernels (a 3x3 kernel gradient
  ran 55x slower there), so Conv2d writes them in that layout itself."""
  rng = np.random.default_rng(1)
  micro_batches = jnp.asarray(rng.normal(size=(2, 2, 72, 72, 4)), jnp.float32)
  model = nn.Sequential([Conv2d(6, 3), Conv2d(6, 1), Conv2d(4, 3)])
  variables = model.init(jax.random.key(0), micro_batches[0])
  grad = jax.grad(lambda v, x: jnp.sum(jnp.sin(model.apply(v, x))))

  def accumulated(variables, micro_batches):
    add = lambda total, x: (jax.tree_util.tree_map(jnp.add, total, grad(variables, x)), None)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, variables)
    return jax.lax.scan(add, zeros, micro_batches)[0]

  compiled = jax.jit(accumulated).lower(variables, micro_batches).compile().as_text()
  convolutions = [line for line in compiled.splitlines() if ' convolution(' in line]
  # forward, input and kernel gradients of the 3x3 layers at least (XLA may make 1x1 ones dots)
  assert len(convolutions) >= 2 * 3
  assert all('dim_labels=b01f_01io->b01f' in line for line in convolutions), convolutions
  ours = jax.jit(accumulated)(variables, micro_batches)
  expected = jax.tree_util.tree_map(jnp.add, *(grad(variables, x) for x in micro_batches))
  for ours, theirs in zip(jax.tree_util.tree_leaves(ours), jax.tree_util.tree_leaves(expected)):
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=2e-6 * float(jnp.max(jnp.abs(theirs))))


def test_conv2d_takes_per_sample_kernel_gradients_for_large_batched_images():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 72, 72, 2)), jnp.float32)
  layer = Conv2d(7, 3, use_bias=False)
  variables = layer.init(jax.random.key(0), x)
  layer_grad = jax.grad(lambda v: jnp.sum(jnp.sin(layer.apply(v, x))))(variables)
  # (the per-sample gradient slices the batch; the batched one has no slice)
  assert ' slice[' in str(jax.make_jaxpr(jax.grad(
      lambda v: jnp.sum(layer.apply(v, x))))(variables))
  expected = jax.grad(lambda k: jnp.sum(jnp.sin(_plain_convolution(x, k))))(
      variables['params']['kernel'])
  np.testing.assert_allclose(layer_grad['params']['kernel'], expected, rtol=0,
                             atol=2e-6 * float(jnp.max(jnp.abs(expected))))
