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
    # XLA:CPU is slow at two convolution kinds this network is full of; GPUs and TPUs keep
    # their native convolution (measurements: the README's Benchmarks section).
    if self.groups == in_features == self.features and self.groups > 1:
      y = jax.lax.platform_dependent(x, kernel, cpu=depthwise_by_shifts, default=convolve)
    elif (self.groups == 1 and k > 1 and _known_batch(x) > 1
          and x.shape[1] * x.shape[2] > PER_SAMPLE_KERNEL_GRAD_MIN_PIXELS):
      y = jax.lax.platform_dependent(x, kernel, cpu=conv_with_per_sample_weight_grad,
                                     default=convolve)
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


@jax.custom_vjp
def conv_with_per_sample_weight_grad(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """A dense 'same' convolution whose kernel gradient is summed over per-sample ones.

  XLA:CPU computes a batch-4 kernel gradient of a 3x3 64->64 convolution at 240 px in ~400 ms,
  four batch-1 ones in ~160 ms: the whole batch-4 training step at 240 px is ~20% faster.
  """
  return _convolution(x, kernel, groups=1)


def _per_sample_forward(x, kernel):
  return conv_with_per_sample_weight_grad(x, kernel), (x, kernel)


def _per_sample_backward(residuals, grad):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x: _convolution(x, kernel, groups=1), x)
  sample_kernel_grads = [
      jax.vjp(lambda w: _convolution(x[i:i + 1], w, groups=1), kernel)[1](grad[i:i + 1])[0]
      for i in range(x.shape[0])]
  return input_vjp(grad)[0], functools.reduce(jnp.add, sample_kernel_grads)


conv_with_per_sample_weight_grad.defvjp(_per_sample_forward, _per_sample_backward)


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
