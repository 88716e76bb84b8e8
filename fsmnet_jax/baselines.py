"""MDUNet: the multi-modal U-Net with concat fusion, first row of the paper's Table 2 (the
ablation's baseline) and MDUNet of its Table 1.

As the reference builds it (`networks/compare_models/mmunet.py`, model name 'unet_multi'): the
two contrasts concatenated as input channels, a four-level U-Net (3x3 convolutions without bias,
instance norm without affine parameters, LeakyReLU 0.2; 2x2 average pooling; 2x2 stride-2
transposed convolutions; skips concatenated), a 1x1 convolution to one channel, no residual to
the input. It is trained with the L1 loss alone (it has no frequency output). Base width 32 in
the reference (7.76 M parameters), NHWC here, initialised as PyTorch initialises its layers.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from fsmnet_jax.layers import Conv2d

NUM_POOLINGS = 4
SIZE_MULTIPLE = 2**NUM_POOLINGS
LEAKY_SLOPE = 0.2
INSTANCE_NORM_EPS = 1e-5  # torch.nn.InstanceNorm2d's default


def instance_norm(x: jax.Array) -> jax.Array:
  """torch.nn.InstanceNorm2d(affine=False): per image and channel, biased variance."""
  mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  variance = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
  return (x - mean) * jax.lax.rsqrt(variance + INSTANCE_NORM_EPS)


class ConvBlock(nn.Module):
  """Twice: 3x3 convolution (no bias), instance norm, LeakyReLU(0.2)."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(2):
      x = Conv2d(self.features, 3, use_bias=False, name=f'conv_{i}')(x)
      x = nn.leaky_relu(instance_norm(x), LEAKY_SLOPE)
    return x


class TransposeConvBlock(nn.Module):
  """2x2 stride-2 transposed convolution (no bias), instance norm, LeakyReLU(0.2)."""
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, height, width, _ = x.shape
    # torch.nn.ConvTranspose2d's fan_in is its weight's dim 1, the output channels.
    bound = 1.0 / math.sqrt(self.features * 4)
    kernel = self.param('kernel', lambda key, shape: jax.random.uniform(
        key, shape, jnp.float32, -bound, bound), (2, 2, x.shape[-1], self.features))
    x, kernel = nn.dtypes.promote_dtype(x, kernel)
    # Stride equal to kernel size: each input pixel writes its own 2x2 output block.
    x = jnp.einsum('bhwc,yxco->bhywxo', x, kernel).reshape(batch, 2 * height, 2 * width,
                                                             self.features)
    return nn.leaky_relu(instance_norm(x), LEAKY_SLOPE)


class MDUNet(nn.Module):
  """`apply(variables, target_under, aux)` -> {'img_out': (B, H, W, 1)}; H and W multiples of
  16. `num_features` is the first level's width (doubled at each of the four levels)."""
  num_features: int = 32

  @nn.compact
  def __call__(self, target_under: jax.Array, aux: jax.Array) -> dict[str, jax.Array]:
    height, width = target_under.shape[1:3]
    if height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
      raise ValueError(f'MDUNet needs image sides divisible by {SIZE_MULTIPLE} ({NUM_POOLINGS} '
                       f'2x poolings); got {height}x{width}.')
    x = jnp.concatenate([target_under, aux], axis=-1)
    skips = []
    for level in range(NUM_POOLINGS):
      x = ConvBlock(self.num_features * 2**level, name=f'down_{level}')(x)
      skips.append(x)
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    x = ConvBlock(self.num_features * 2**NUM_POOLINGS, name='bottleneck')(x)
    for level in reversed(range(NUM_POOLINGS)):
      features = self.num_features * 2**level
      x = TransposeConvBlock(features, name=f'up_{level}')(x)
      x = ConvBlock(features, name=f'up_conv_{level}')(jnp.concatenate([x, skips[level]], -1))
    return {'img_out': Conv2d(1, 1, name='out')(x)}
