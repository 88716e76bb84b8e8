"""Primitive layers initialised and laid out like their PyTorch counterparts in the reference."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fsmnet_jax import conv

# The reference replaces non-finite activations with this value after every fusion and
# frequency block (torch.nan_to_num(..., nan=1e-5, posinf=1e-5, neginf=1e-5)).
NON_FINITE_FILL = 1e-5
PRELU_INIT = 0.25


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
    y = conv.conv2d(x, kernel, feature_group_count=self.groups)
    return y if bias is None else y + bias


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
