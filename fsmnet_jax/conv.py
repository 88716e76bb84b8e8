"""Stride-1 'same' 2-D convolution, with XLA:CPU workarounds (docs/xla_cpu_convolutions.md)."""

import contextvars
import functools
from typing import Callable

import jax
import jax.numpy as jnp

# Below this many pixels XLA:CPU's own kernel gradient is fast enough: the per-sample and
# by-rows forms gain little on small feature maps and cost compile time.
LARGE_MAP_MIN_PIXELS = 64 * 64

# `specialized_for(XLA_NATIVE, fn)`: XLA's own convolutions on any device, those GPUs and TPUs
# run (fsmnet-bench's jax-xla-conv measures what the CPU paths gain against them).
XLA_NATIVE = 'xla'

# The platform whose path conv2d traces alone (see `specialized_for`); None: every path.
_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar('platform', default=None)


def specialized_for(platform: str | None, fn: Callable) -> Callable:
  """`fn`, with the convolutions it traces taking the path of `platform` (a
  `jax.Device.platform`, or XLA_NATIVE) alone. For programs jitted for known devices: staging
  out every platform's path for lowering to choose (`lax.platform_dependent`) traces and
  differentiates the unused ones too, ~1.7x the tracing time of the training step. None keeps
  every path (for exports to several platforms).
  """
  @functools.wraps(fn)
  def specialized(*args, **kwargs):
    token = _PLATFORM.set(platform)
    try:
      return fn(*args, **kwargs)
    finally:
      _PLATFORM.reset(token)
  return specialized


def conv2d(x: jax.Array, kernel: jax.Array, *, feature_group_count: int = 1) -> jax.Array:
  """Stride-1 'same' convolution of NHWC `x` by an odd-sized HWIO `kernel`, NHWC out."""
  plain = functools.partial(_plain_conv2d, feature_group_count=feature_group_count)
  # XLA:CPU is slow at depthwise convolutions and at some gradients of dense ones; GPUs and
  # TPUs keep their native convolution.
  if feature_group_count == x.shape[-1] == kernel.shape[-1] and feature_group_count > 1:
    return _by_platform(x, kernel, cpu=_depthwise_by_shifts,
                        default=jax.named_scope('depthwise_conv')(plain))
  if feature_group_count == 1:
    return _by_platform(
        x, kernel, default=plain,
        cpu=functools.partial(_conv_with_explicit_gradients,
                              kernel_gradient=kernel_gradient_form(x.shape, kernel.shape)))
  return plain(x, kernel)


def _by_platform(x: jax.Array, kernel: jax.Array, *, cpu: Callable, default: Callable
                 ) -> jax.Array:
  platform = _PLATFORM.get()
  if platform is None:
    return jax.lax.platform_dependent(x, kernel, cpu=cpu, default=default)
  return (cpu if platform == 'cpu' else default)(x, kernel)


def kernel_gradient_form(x_shape: tuple, kernel_shape: tuple) -> str:
  """How the CPU path computes the kernel gradient of a dense convolution of an NHWC input of
  `x_shape` by an HWIO kernel of `kernel_shape` (measured: docs/xla_cpu_convolutions.md).

  'by_rows' where the output has more channels than the input, 'per_sample' for other batches
  of large images, else 'convolution' (XLA's own), always so for a symbolic batch (jax.export
  with a polymorphic batch: it cannot be sliced into samples nor its rows counted).
  """
  batch, height, width, channels_in = x_shape
  large = kernel_shape[0] > 1 and height * width > LARGE_MAP_MIN_PIXELS
  if not large or not isinstance(batch, int):
    return 'convolution'
  if channels_in < kernel_shape[-1]:
    return 'by_rows'
  return 'per_sample' if batch > 1 else 'convolution'


def _plain_conv2d(x: jax.Array, kernel: jax.Array, feature_group_count: int) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding='SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=feature_group_count)


# Depthwise: XLA:CPU runs a grouped convolution with one channel per group, and its gradient,
# far slower than k*k shifted slices of the padded input scaled per channel.


# The named scopes label these ops in profiles (fsmnet-bench --profile's op classes).


@jax.named_scope('depthwise_conv')
def _shifted_sum(x: jax.Array, kernel: jax.Array) -> jax.Array:
  k = kernel.shape[0]
  height, width = x.shape[1:3]
  padded = _pad_same(x, k)
  taps = [padded[:, i:i + height, j:j + width, :] * kernel[i, j, 0]
          for i in range(k) for j in range(k)]
  return functools.reduce(jnp.add, taps)


def _pad_same(x: jax.Array, k: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))


@jax.custom_vjp
def _depthwise_by_shifts(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A 'same' depthwise convolution of NHWC `x` by a (k, k, 1, C) kernel, written as the sum of
  k*k shifted copies of the padded input, each scaled per channel; hand-written gradient."""
  return _shifted_sum(x, kernel)


def _depthwise_forward(x, kernel):
  return _shifted_sum(x, kernel), (x, kernel)


@jax.named_scope('depthwise_conv')
def _depthwise_backward(residuals, grad):
  x, kernel = residuals
  k = kernel.shape[0]
  height, width = x.shape[1:3]
  # The input gradient is the same convolution of the output gradient, kernel flipped.
  dx = _shifted_sum(grad, kernel[::-1, ::-1])
  # Tap (i, j) correlates x with the output gradient shifted by (i, j). Shifting the gradient
  # rather than x keeps XLA from sharing (and so keeping alive from the forward pass until
  # here) k*k shifted copies of every depthwise input.
  padded = _pad_same(grad, k)
  dk = [jnp.sum(x * padded[:, k - 1 - i:k - 1 - i + height, k - 1 - j:k - 1 - j + width, :],
                axis=(0, 1, 2), dtype=jnp.promote_types(x.dtype, jnp.float32))
        for i in range(k) for j in range(k)]
  return dx, jnp.stack(dk).reshape(kernel.shape).astype(kernel.dtype)


_depthwise_by_shifts.defvjp(_depthwise_forward, _depthwise_backward)


# Dense: XLA rewrites its own gradient convolutions into the one layout XLA:CPU runs with its
# fast kernels, plain NHWC, only in the entry computation; inside a loop body (the scan of
# gradient accumulation) they run on a naive kernel. So the gradients are written out in that
# layout here. XLA:CPU's kernel gradient, a convolution with a window as large as the image,
# is also slower batched than summed over samples, and ~3x slower still when the output has
# more channels than the input: `kernel_gradient_form`.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_with_explicit_gradients(x: jax.Array, kernel: jax.Array,
                                  kernel_gradient: str) -> jax.Array:
  """A dense 'same' convolution (odd kernel size) whose gradients are plain NHWC convolutions,
  its kernel gradient computed in the form `kernel_gradient` (see `kernel_gradient_form`)."""
  del kernel_gradient  # a property of the gradient only
  return _plain_conv2d(x, kernel, feature_group_count=1)


def _explicit_forward(x, kernel, kernel_gradient):
  return _conv_with_explicit_gradients(x, kernel, kernel_gradient), (x, kernel)


def _explicit_backward(kernel_gradient, residuals, grad):
  x, kernel = residuals
  # The input gradient: the same convolution of the output gradient, the kernel flipped in
  # space and its input and output channels swapped.
  with jax.named_scope('conv_input_gradient'):
    dx = _plain_conv2d(grad, kernel[::-1, ::-1].swapaxes(2, 3), feature_group_count=1)
  k = kernel.shape[0]
  if kernel_gradient == 'by_rows':
    dk = _kernel_gradient_by_rows(x, grad, k)
  elif kernel_gradient == 'per_sample':
    dk = functools.reduce(jnp.add, [_kernel_gradient(x[i:i + 1], grad[i:i + 1], k)
                                    for i in range(x.shape[0])])
  else:
    dk = _kernel_gradient(x, grad, k)
  return dx, dk.astype(kernel.dtype)


@jax.named_scope('conv_kernel_gradient')
def _kernel_gradient(x: jax.Array, grad: jax.Array, k: int) -> jax.Array:
  """dK[a, b, i, o] = sum over n, h, w of x_padded[n, h + a, w + b, i] * grad[n, h, w, o]: a
  convolution of x, channels as batch, by the output gradient, batch as input channels."""
  p = k // 2
  dk = jax.lax.conv_general_dilated(
      x.transpose(3, 1, 2, 0), grad.transpose(1, 2, 0, 3), window_strides=(1, 1),
      padding=((p, p), (p, p)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return dk.transpose(1, 2, 0, 3)


@jax.named_scope('conv_kernel_gradient')
def _kernel_gradient_by_rows(x: jax.Array, grad: jax.Array, k: int) -> jax.Array:
  """`_kernel_gradient` as a loop over the image rows of the batch, each adding one matrix
  product: the row's k*k shifted copies of the padded input side by side (width x k*k*in)
  transposed, times that row of the output gradient (width x out). A row's copies stay in
  cache; those of a whole image would not."""
  batch, height, width, channels_in = x.shape
  p = k // 2
  padded = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
  padded = padded.reshape(batch * (height + 2 * p), width + 2 * p, channels_in)
  # Output row h of image n reads padded rows (height + 2p) * n + h ... + k - 1.
  first_rows = (jnp.arange(batch)[:, None] * (height + 2 * p) + jnp.arange(height)).reshape(-1)

  def add_row(total, first_row_and_grad_row):
    first_row, grad_row = first_row_and_grad_row
    window = jax.lax.dynamic_slice_in_dim(padded, first_row, k, axis=0)
    taps = jnp.concatenate([window[a, b:b + width] for a in range(k) for b in range(k)], axis=1)
    return total + jnp.matmul(taps.T, grad_row, preferred_element_type=jnp.float32), None

  channels_out = grad.shape[-1]
  total, _ = jax.lax.scan(
      add_row, jnp.zeros((k * k * channels_in, channels_out), jnp.float32),
      (first_rows, grad.reshape(batch * height, width, channels_out)), unroll=4)
  return total.reshape(k, k, channels_in, channels_out)


_conv_with_explicit_gradients.defvjp(_explicit_forward, _explicit_backward)
