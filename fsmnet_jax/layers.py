"""Primitive layers initialised and laid out like their PyTorch counterparts in the reference."""

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

# The reference replaces non-finite activations with this value after every fusion and
# frequency block (torch.nan_to_num(..., nan=1e-5, posinf=1e-5, neginf=1e-5)).
NON_FINITE_FILL = 1e-5
PRELU_INIT = 0.25
# XLA:CPU's kernel gradient of a batched 3x3 convolution is slower than the sum of per-sample
# ones, and falls off a cliff on large images (batch 4, 64->64 channels: 8.8 vs 6.5 ms at 60 px,
# 37.6 vs 32.2 ms at 120 px, 397 vs 162 ms at 240 px). On small feature maps the gain is small
# and the unrolled form costs compile time, so it starts above this many pixels.
PER_SAMPLE_KERNEL_GRAD_MIN_PIXELS = 64 * 64


def _uniform(bound: float) -> nn.initializers.Initializer:
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


class Conv2d(nn.Module):
  """Stride-1 'same' convolution, NHWC / HWIO, initialised as `torch.nn.Conv2d`.

  PyTorch draws weights with kaiming_uniform(a=sqrt(5)) and biases from U(+-1/sqrt(fan_in));
  both bounds reduce to 1/sqrt(fan_in), fan_in = in_channels / groups * kernel_size**2.
  """
  features: int
  kernel_size: int = 3
  use_bias: bool = True
  groups: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    k = self.kernel_size
    bound = 1.0 / math.sqrt(in_features // self.groups * k * k)
    kernel = self.param('kernel', _uniform(bound), (k, k, in_features // self.groups, self.features))
    bias = self.param('bias', _uniform(bound), (self.features,)) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias)
    convolve = functools.partial(_convolution, groups=self.groups)
    # XLA:CPU is slow at depthwise convolutions and at some gradients of dense ones; GPUs and
    # TPUs keep their native convolution (measurements: the README's Benchmarks section).
    if self.groups == in_features == self.features and self.groups > 1:
      y = jax.lax.platform_dependent(x, kernel, cpu=depthwise_by_shifts, default=convolve)
    elif self.groups == 1:
      per_sample = (k > 1 and _known_batch(x) > 1
                    and x.shape[1] * x.shape[2] > PER_SAMPLE_KERNEL_GRAD_MIN_PIXELS)
      y = jax.lax.platform_dependent(
          x, kernel, default=convolve,
          cpu=functools.partial(conv_with_explicit_gradients, per_sample_kernel_grad=per_sample))
    else:
      y = convolve(x, kernel)
    return y if bias is None else y + bias


def _known_batch(x: jax.Array) -> int:
  """The batch size, or 0 if it is symbolic (jax.export with a polymorphic batch)."""
  return x.shape[0] if isinstance(x.shape[0], int) else 0


def _convolution(x: jax.Array, kernel: jax.Array, groups: int) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding='SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)


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
def depthwise_by_shifts(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A 'same' depthwise convolution of NHWC `x` by a (k, k, 1, C) kernel, written as the sum of
  k*k shifted copies of the padded input, each scaled per channel.

  XLA:CPU runs a grouped convolution with one channel per group ~35x slower than this, and
  its gradient ~6x slower than the hand-written one below.
  """
  return _shifted_sum(x, kernel)


def _depthwise_forward(x, kernel):
  return _shifted_sum(x, kernel), (x, kernel)


def _depthwise_backward(residuals, grad):
  x, kernel = residuals
  k = kernel.shape[0]
  height, width = x.shape[1:3]
  # The input gradient is the same convolution of the output gradient, kernel flipped.
  dx = _shifted_sum(grad, kernel[::-1, ::-1])
  # Tap (i, j) correlates x with the output gradient shifted by (i, j). Shifting the gradient
  # rather than x keeps XLA from sharing (and so keeping alive from the forward pass until
  # here) k*k shifted copies of every depthwise input: 9 GiB at batch 4, 240 px.
  padded = _pad_same(grad, k)
  dk = [jnp.sum(x * padded[:, k - 1 - i:k - 1 - i + height, k - 1 - j:k - 1 - j + width, :],
                axis=(0, 1, 2), dtype=jnp.promote_types(x.dtype, jnp.float32))
        for i in range(k) for j in range(k)]
  return dx, jnp.stack(dk).reshape(kernel.shape).astype(kernel.dtype)


depthwise_by_shifts.defvjp(_depthwise_forward, _depthwise_backward)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv_with_explicit_gradients(x: jax.Array, kernel: jax.Array,
                                 per_sample_kernel_grad: bool = False) -> jax.Array:
  """A dense 'same' convolution (odd kernel size) whose gradients are written out as plain
  NHWC convolutions, the one layout XLA:CPU runs with its fast (Eigen) kernels.

  XLA rewrites its own gradient convolutions into that layout only in the entry computation:
  inside a loop body (the scan of gradient accumulation) they run on a naive kernel, 9x (input
  gradient) and 55x (kernel gradient) slower at 64 px. With `per_sample_kernel_grad`, the
  kernel gradient of a batch is the sum of per-sample ones: XLA:CPU computes a batch-4 kernel
  gradient of a 3x3 64->64 convolution at 240 px in ~400 ms, four batch-1 ones in ~160 ms.
  """
  del per_sample_kernel_grad  # a property of the gradient only
  return _convolution(x, kernel, groups=1)


def _explicit_forward(x, kernel, per_sample_kernel_grad):
  return conv_with_explicit_gradients(x, kernel, per_sample_kernel_grad), (x, kernel)


def _explicit_backward(per_sample_kernel_grad, residuals, grad):
  x, kernel = residuals
  # The input gradient: the same convolution of the output gradient, the kernel flipped in
  # space and its input and output channels swapped.
  dx = _convolution(grad, kernel[::-1, ::-1].swapaxes(2, 3), groups=1)
  if per_sample_kernel_grad:
    dk = functools.reduce(jnp.add, [_kernel_gradient(x[i:i + 1], grad[i:i + 1], kernel.shape[0])
                                    for i in range(x.shape[0])])
  else:
    dk = _kernel_gradient(x, grad, kernel.shape[0])
  return dx, dk


def _kernel_gradient(x: jax.Array, grad: jax.Array, k: int) -> jax.Array:
  """dK[a, b, i, o] = sum over n, h, w of x_padded[n, h + a, w + b, i] * grad[n, h, w, o]: a
  convolution of x, channels as batch, by the output gradient, batch as input channels."""
  p = k // 2
  dk = jax.lax.conv_general_dilated(
      x.transpose(3, 1, 2, 0), grad.transpose(1, 2, 0, 3), window_strides=(1, 1),
      padding=((p, p), (p, p)), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  return dk.transpose(1, 2, 0, 3)


conv_with_explicit_gradients.defvjp(_explicit_forward, _explicit_backward)


class Scale(nn.Module):
  """A learnable scalar multiplier (the reference's `Scale`, initialised to 1)."""
  init_value: float = 1.0

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.param('scale', nn.initializers.constant(self.init_value), (), jnp.float32)


class ConvAct(nn.Module):
  """Bias-free convolution, optionally followed by a single-slope PReLU (ConvBNReLU2D, no norm)."""
  features: int
  kernel_size: int = 3
  prelu: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = Conv2d(self.features, self.kernel_size, use_bias=False, name='conv')(x)
    if self.prelu:
      x = nn.PReLU(negative_slope_init=PRELU_INIT, name='prelu')(x)
    return x


def pixel_shuffle(x: jax.Array, factor: int = 2) -> jax.Array:
  """NHWC `torch.nn.PixelShuffle`: input channel c*f*f + dy*f + dx goes to (f*h+dy, f*w+dx, c)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, c // factor**2, factor, factor)
  x = x.transpose(0, 1, 4, 2, 5, 3)
  return x.reshape(b, h * factor, w * factor, c // factor**2)


def pixel_unshuffle(x: jax.Array, factor: int = 2) -> jax.Array:
  """Inverse of `pixel_shuffle`, with the reference's (c, dy, dx) output channel order."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // factor, factor, w // factor, factor, c)
  x = x.transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(b, h // factor, w // factor, c * factor**2)


def replace_non_finite(x: jax.Array) -> jax.Array:
  """The reference's NaN/inf guard."""
  return jnp.nan_to_num(x, nan=NON_FINITE_FILL, posinf=NON_FINITE_FILL, neginf=NON_FINITE_FILL)
