"""Tests for conv2d: each path it takes computes the convolution and its gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fsmnet_jax.conv import conv2d, kernel_gradient_form, specialized_for

on_cpu_only = pytest.mark.skipif(jax.default_backend() != 'cpu',
                                 reason='the XLA:CPU paths of conv2d')


def _lax_convolution(x, kernel, groups=1):
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), 'SAME', feature_group_count=groups,
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _sin_loss(convolve):
  return lambda x, kernel: jnp.sum(jnp.sin(convolve(x, kernel)))


def _normal(rng, shape):
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


def _assert_close_to_largest(ours, theirs, rel=2e-6):
  # Sums in another order than XLA's own (measured: at most 4.6e-7 of the largest).
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=rel * float(jnp.max(jnp.abs(theirs))))


def test_depthwise_is_the_grouped_convolution():
  rng = np.random.default_rng(0)
  x, kernel = _normal(rng, (2, 12, 10, 6)), _normal(rng, (3, 3, 1, 6))
  ours = lambda x, k: conv2d(x, k, feature_group_count=6)
  grouped = lambda x, k: _lax_convolution(x, k, groups=6)
  # Nine products summed in another order: float32 rounding only (measured <= 1e-6).
  np.testing.assert_allclose(jax.jit(ours)(x, kernel), grouped(x, kernel), atol=2e-6)
  for mine, theirs in zip(jax.grad(_sin_loss(ours), (0, 1))(x, kernel),
                          jax.grad(_sin_loss(grouped), (0, 1))(x, kernel)):
    np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5)  # measured 4.4e-7 relative


@on_cpu_only
def test_depthwise_on_cpu_runs_as_shifted_slices():
  x, kernel = jnp.ones((2, 12, 10, 6)), jnp.ones((3, 3, 1, 6))
  step = jax.grad(_sin_loss(lambda x, k: conv2d(x, k, feature_group_count=6)), (0, 1))
  assert ' convolution(' not in jax.jit(step).lower(x, kernel).compile().as_text()


@pytest.mark.parametrize('groups', [1, 6], ids=['dense', 'depthwise'])
def test_specialized_tracing_stages_out_one_platforms_path(groups):
  rng = np.random.default_rng(0)
  x, kernel = _normal(rng, (2, 12, 10, 6)), _normal(rng, (3, 3, 6 // groups, 6))
  convolve = lambda x, k: conv2d(x, k, feature_group_count=groups)
  step = jax.value_and_grad(_sin_loss(convolve), (0, 1))
  traced = lambda f, platform=None: str(jax.make_jaxpr(specialized_for(platform, f))(x, kernel))
  assert 'platform_index' in traced(convolve) and 'platform_index' in traced(step)
  for platform in ('cpu', 'gpu'):
    assert 'platform_index' not in traced(convolve, platform) + traced(step, platform)
    # The CPU paths are custom_vjp functions, the native one is not.
    assert ('custom_vjp_call' in traced(convolve, platform)) == (platform == 'cpu')
  # On this machine the specialized program is the staged-out one, bit for bit.
  specialized = specialized_for(jax.default_backend(), step)
  for ours, theirs in zip(jax.tree_util.tree_leaves(jax.jit(specialized)(x, kernel)),
                          jax.tree_util.tree_leaves(jax.jit(step)(x, kernel))):
    np.testing.assert_array_equal(ours, theirs)


def test_grouped_but_not_depthwise_is_the_grouped_convolution():
  rng = np.random.default_rng(0)
  x, kernel = _normal(rng, (2, 12, 10, 6)), _normal(rng, (3, 3, 3, 4))
  np.testing.assert_array_equal(conv2d(x, kernel, feature_group_count=2),
                                _lax_convolution(x, kernel, groups=2))


@pytest.mark.parametrize('shape,kernel_size,channels_out,form', [
    ((3, 12, 10, 9), 3, 7, 'convolution'), ((3, 12, 10, 5), 3, 7, 'convolution'),  # small images
    ((2, 72, 72, 9), 3, 7, 'per_sample'), ((2, 72, 72, 9), 1, 7, 'convolution'),  # no 1x1 forms
    ((1, 72, 72, 9), 3, 7, 'convolution'), ((2, 64, 64, 9), 3, 7, 'convolution'),  # batch 1; 64^2
    ((2, 72, 72, 2), 3, 7, 'by_rows'), ((1, 70, 66, 2), 5, 7, 'by_rows'),  # more channels out
    ((2, 72, 72, 2), 1, 7, 'convolution')])
def test_dense_gradients_are_the_convolution_gradients(shape, kernel_size, channels_out, form):
  kernel_shape = (kernel_size, kernel_size, shape[-1], channels_out)
  assert kernel_gradient_form(shape, kernel_shape) == form
  rng = np.random.default_rng(0)
  x, kernel = _normal(rng, shape), _normal(rng, kernel_shape)
  np.testing.assert_array_equal(conv2d(x, kernel), _lax_convolution(x, kernel))
  ours = jax.grad(_sin_loss(conv2d), (0, 1))
  # (the per-sample kernel gradient slices the batch, the by-rows one loops over the rows)
  traced = str(jax.make_jaxpr(ours)(x, kernel))
  assert (' scan[' in traced, ' slice[' in traced) == {
      'by_rows': (True, True), 'per_sample': (False, True), 'convolution': (False, False)}[form]
  expected = jax.grad(_sin_loss(_lax_convolution), (0, 1))(x, kernel)
  for mine, theirs in zip(ours(x, kernel), expected):
    _assert_close_to_largest(mine, theirs)


@on_cpu_only
def test_gradients_in_a_loop_are_plain_nhwc_convolutions():
  """Gradient accumulation scans over micro-batches; inside the loop XLA:CPU does not rewrite
  its own gradient convolutions into the layout of its fast kernels, so conv2d writes them in
  that layout itself."""
  rng = np.random.default_rng(1)
  micro_batches = _normal(rng, (2, 2, 72, 72, 4))
  kernels = [_normal(rng, shape) for shape in ((3, 3, 4, 6), (1, 1, 6, 6), (3, 3, 6, 4))]

  def loss(kernels, x):
    for kernel in kernels:
      x = conv2d(x, kernel)
    return jnp.sum(jnp.sin(x))

  def accumulated(kernels, micro_batches):
    add = lambda total, x: (jax.tree_util.tree_map(jnp.add, total, jax.grad(loss)(kernels, x)),
                            None)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, kernels)
    return jax.lax.scan(add, zeros, micro_batches)[0]

  compiled = jax.jit(accumulated).lower(kernels, micro_batches).compile().as_text()
  convolutions = [line for line in compiled.splitlines() if ' convolution(' in line]
  # forward, input and kernel gradients of the 3x3 layers at least (XLA may make 1x1 ones dots)
  assert len(convolutions) >= 2 * 3
  assert all('dim_labels=b01f_01io->b01f' in line for line in convolutions), convolutions
  ours = jax.jit(accumulated)(kernels, micro_batches)
  expected = jax.tree_util.tree_map(jnp.add, *(jax.grad(loss)(kernels, x) for x in micro_batches))
  for mine, theirs in zip(ours, expected):
    _assert_close_to_largest(mine, theirs)


def test_symbolic_batch_exports_with_the_batched_kernel_gradient():
  """jax.export with a polymorphic batch cannot slice the batch into samples nor count its
  rows: XLA's own kernel gradient, where a known batch of this shape would loop over rows."""
  rng = np.random.default_rng(0)
  x, kernel = _normal(rng, (2, 72, 72, 2)), _normal(rng, (3, 3, 2, 7))
  grad = jax.grad(_sin_loss(conv2d), (0, 1))
  batch, = jax.export.symbolic_shape('b')
  symbolic_x = jax.ShapeDtypeStruct((batch, 72, 72, 2), jnp.float32)
  traced = str(jax.make_jaxpr(grad)(symbolic_x, kernel))
  assert ' slice[' not in traced and ' scan[' not in traced
  assert ' scan[' in str(jax.make_jaxpr(grad)(x, kernel))
  exported = jax.export.export(jax.jit(grad))(symbolic_x, kernel)
  for mine, theirs in zip(exported.call(x, kernel),
                          jax.grad(_sin_loss(_lax_convolution), (0, 1))(x, kernel)):
    _assert_close_to_largest(mine, theirs)
