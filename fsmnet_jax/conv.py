"""Stride-1 'same' 2-D convolution, with XLA:CPU workarounds (docs/xla_cpu_convolutions.md)."""

import contextvars
import functools
from typing import Callable

import jax
import jax.numpy as jnp

# Per-sample kernel gradients pay off only on large feature maps: on small ones the gain is
# small and the unrolled form costs compile time, so they start above this many pixels.
PER_SAMPLE_KERNEL_GRAD_MIN_PIXELS = 64 * 64

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
    per_sample = (kernel.shape[0] > 1 and _known_batch(x) > 1
                  and x.shape[1] * x.shape[2] > PER_SAMPLE_KERNEL_GRAD_MIN_PIXELS)
    return _by_platform(
        x, kernel, default=plain,
        cpu=functools.partial(_conv_with_explicit_gradients, per_sample_kernel_grad=per_sample))
  return plain(x, kernel)


def _by_platform(x: jax.Array, kernel: jax.Array, *, cpu: Callable, default: Callable
                 ) -> jax.Array:
  platform = _PLATFORM.get()
  if platform is None:
    return jax.lax.platform_dependent(x, kernel, cpu=cpu, default=default)
  return (cpu if platform == 'cpu' else default)(x, kernel)


def _known_batch(x: jax.Array) -> int:
  """The batch size, or 0 if it is symbolic (jax.export with a polymorphic batch)."""
  return x.shape[0] if isinstance(x.shape[0], int) else 0


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
# fast (Eigen) kernels, plain NHWC, only in the entry computation; inside a loop body (the scan
# of gradient accumulation) they run on a naive kernel. So the gradients are written out in
# that layout here. XLA:CPU's kernel gradient of a batched 3x3 convolution is also slower than
# the sum of per-sample ones, and falls off a cliff on large images: `per_sample_kernel_grad`.


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_with_explicit_gradients(x: jax.Array, kernel: jax.Array,
                                  per_sample_kernel_grad: bool) -> jax.Array:
  """A dense 'same' convolution (odd kernel size) whose gradients are plain NHWC convolutions,
  the kernel gradient of a batch summed over per-sample ones with `per_sample_kernel_grad`."""
  del per_sample_kernel_grad  # a property of the gradient only
  return _plain_conv2d(x, kernel, feature_group_count=1)


def _explicit_forward(x, kernel, per_sample_kernel_grad):
  return _conv_with_explicit_gradients(x, kernel, per_sample_kernel_grad), (x, kernel)


def _explicit_backward(per_sample_kernel_grad, residuals, grad):
  x, kernel = residuals
  # The input gradient: the same convolution of the output gradient, the kernel flipped in
  # space and its input and output channels swapped.
  with jax.named_scope('conv_input_gradient'):
    dx = _plain_conv2d(grad, kernel[::-1, ::-1].swapaxes(2, 3), feature_group_count=1)
  if per_sample_kernel_grad:
    dk = functools.reduce(jnp.add, [_kernel_gradient(x[i:i + 1], grad[i:i + 1], kernel.shape[0])
                                    for i in range(x.shape[0])])
  else:
    dk = _kernel_gradient(x, grad, kernel.shape[0])
  return dx, dk


@jax.named_scope('conv_kernel_gradient')
def _kernel_gradient(x: jax.Array, grad: jax.Array, k: int) -> jax.Array:
  """dK[a, b, i, o] = sum over n, h, w of x_padded[n, h + a, w + b, i] * grad[n, h, w, o]: a
  convolution of x, channels as batch, by the output gradient, batch as input channels."""
  p = k // 2
  dk = jax.lax.conv_general_dilated(
      x.transpose(3, 1, 2, 0), grad.transpose(1, 2, 0, 3), window_strides=(1, 1),
      padding=((p, p), (p, p)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return dk.transpose(1, 2, 0, 3)


_conv_with_explicit_gradients.defvjp(_explicit_forward, _explicit_backward)
