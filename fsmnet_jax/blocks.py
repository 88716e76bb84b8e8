"""FSMNet's blocks, named after the paper: the FSFE branches (ResidualGroup, FreBlock),
CMS-fusion, FS-fusion and its channel cross-attention, and the resampling layers.

Parameter names follow the reference state_dict (`fpre`, `amp_fuse_0`, `fre_att`, ...) so
that weight conversion is a rename plus a layout change.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from fsmnet_jax import fourier
from fsmnet_jax.layers import (PRELU_INIT, Conv2d, ConvAct, Scale, pixel_shuffle, pixel_unshuffle,
                               replace_non_finite)

# The reference adds 1e-8 before the forward FFT and to the rebuilt spectrum so that no
# bin is exactly zero; kept for parity.
FFT_EPS = 1e-8
# torch.nn.functional.normalize's default epsilon.
L2_NORMALIZE_EPS = 1e-12
FREQ_LEAKY_SLOPE = 0.1


class ResBlock(nn.Module):
  """conv3x3 -> ReLU -> conv3x3, plus the input, then ReLU (bias-free convs)."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    y = nn.relu(Conv2d(c, 3, use_bias=False, name='conv_0')(x))
    y = Conv2d(c, 3, use_bias=False, name='conv_1')(y)
    return nn.relu(y + x)


class ResidualGroup(nn.Module):
  """The spatial branch of an FSFE stage: ResBlocks, conv3x3+PReLU, and a scaled skip."""
  num_res_blocks: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    y = x
    for i in range(self.num_res_blocks):
      y = ResBlock(name=f'res_block_{i}')(y)
    y = ConvAct(x.shape[-1], 3, name='tail')(y)
    return y + Scale(name='re_scale')(x)


class FreBlock(nn.Module):
  """The frequency branch of an FSFE stage: residual convs on the amplitude and phase of rfft2.

  Reproduces the reference's epsilons, its |irfft2| and its NaN guard.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    _, height, width, c = x.shape
    amp, pha = fourier.amplitude_phase(Conv2d(c, 1, name='fpre')(x) + FFT_EPS)

    def refine(z, name):
      y = Conv2d(c, 3, name=f'{name}_0')(z)
      y = nn.leaky_relu(y, FREQ_LEAKY_SLOPE)
      return Conv2d(c, 3, name=f'{name}_1')(y) + z

    amp = refine(amp, 'amp_fuse')
    pha = refine(pha, 'pha_fuse')
    real = amp * jnp.cos(pha) + FFT_EPS
    imag = amp * jnp.sin(pha) + FFT_EPS
    # The reference adds FFT_EPS once more to the complex spectrum: it lands on the real part.
    y = jnp.abs(fourier.inverse_amplitude_phase(real + FFT_EPS, imag, height, width))
    # The spectral convolutions ran in float32; go back to the compute precision (bfloat16 in
    # mixed-precision training) for the rest of the network.
    y = y.astype(x.dtype)
    return replace_non_finite(Conv2d(c, 1, name='post')(y) + x)


class DownSample(nn.Module):
  """conv3x3 -> pixel unshuffle by 2 -> conv1x1 (4F -> F), bias-free."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = ConvAct(c, 3, prelu=False, name='conv')(x)
    return ConvAct(c, 1, prelu=False, name='proj')(pixel_unshuffle(x, 2))


class UpSample(nn.Module):
  """conv1x1 (F -> 4F, with bias) -> pixel shuffle by 2 -> PReLU."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    x = pixel_shuffle(Conv2d(4 * c, 1, name='conv')(x), 2)
    return nn.PReLU(negative_slope_init=PRELU_INIT, name='prelu')(x)


def _l2_normalize(x: jax.Array, axis: int) -> jax.Array:
  # max(|x|, eps) written as sqrt(max(|x|^2, eps^2)) so the gradient stays finite at x = 0.
  sum_sq = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x / jnp.sqrt(jnp.maximum(sum_sq, L2_NORMALIZE_EPS**2))


class ChannelCrossAttention(nn.Module):
  """Restormer-style transposed cross-attention: queries from `x`, keys and values from `y`.

  Attention is over channels (a C/heads x C/heads map per head), so its cost is linear in
  the number of pixels.
  """
  num_heads: int = 8

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    heads = self.num_heads
    q = Conv2d(c, 1, use_bias=False, name='q')(x)
    q = Conv2d(c, 3, use_bias=False, groups=c, name='q_dwconv')(q)
    kv = Conv2d(2 * c, 1, use_bias=False, name='kv')(y)
    kv = Conv2d(2 * c, 3, use_bias=False, groups=2 * c, name='kv_dwconv')(kv)
    k, v = jnp.split(kv, 2, axis=-1)
    q, k, v = (t.reshape(b, h * w, c) for t in (q, k, v))
    q, k = _l2_normalize(q, axis=1), _l2_normalize(k, axis=1)
    temperature = self.param('temperature', nn.initializers.ones, (heads,), jnp.float32)
    # The heads' c/heads x c/heads maps are the diagonal blocks of one c x c map (the head
    # index is the major part of the channel); the rest is masked out before the softmax.
    # One c x c product over the pixels costs `heads` times the FLOPs of the per-head ones
    # but keeps the pixels' NHWC layout: per-head products made XLA:CPU transpose q, k, v
    # and the output, twice as slow in all at 240 px.
    head = jnp.arange(c) // (c // heads)
    logits = jnp.einsum('bnc,bnd->bcd', q, k) * temperature[head][:, None]
    logits = jnp.where(head[:, None] == head[None, :], logits, -jnp.inf)
    out = jnp.einsum('bcd,bnd->bnc', jax.nn.softmax(logits, axis=-1), v)
    return Conv2d(c, 1, use_bias=False, name='project_out')(out.reshape(b, h, w, c))


def _selective_sum(a: jax.Array, b: jax.Array) -> jax.Array:
  """Pixel-wise gated sum a*g_a + b*g_b, the gates predicted from both (Eq. 3-4).

  Must be called from a compact method: its convs become `fuse_0`, `fuse_1` of the caller.
  """
  c = a.shape[-1]
  gates = Conv2d(c, 3, name='fuse_0')(jnp.concatenate([a, b], axis=-1))
  gates = nn.sigmoid(Conv2d(2 * c, 3, name='fuse_1')(gates))
  gate_a, gate_b = jnp.split(gates, 2, axis=-1)
  return replace_non_finite(a * gate_a + b * gate_b)


class CMSFusion(nn.Module):
  """Cross-Modal Selective fusion: adds auxiliary (T1) features to the target's, gated."""

  @nn.compact
  def __call__(self, aux: jax.Array, target: jax.Array) -> jax.Array:
    c = target.shape[-1]
    return _selective_sum(Conv2d(c, 3, name='t1')(aux), Conv2d(c, 3, name='t2')(target))


class FSFusion(nn.Module):
  """Frequency-Spatial fusion: cross-attention both ways, then a gated sum.

  The reference's block receives its arguments swapped, so its conv named `fre` sees the
  spatial features and `spa` the frequency ones; the names are kept for weight conversion.
  It also runs both attention calls through `fre_att`: `spa_att` exists but is unused unless
  `use_spa_att` is set.
  """
  num_heads: int = 8
  use_spa_att: bool = False

  @nn.compact
  def __call__(self, freq: jax.Array, spatial: jax.Array) -> jax.Array:
    c = spatial.shape[-1]
    spatial = Conv2d(c, 3, name='fre')(spatial)
    freq = Conv2d(c, 3, name='spa')(freq)
    fre_att = ChannelCrossAttention(self.num_heads, name='fre_att')
    spa_att = ChannelCrossAttention(self.num_heads, name='spa_att')
    if not self.use_spa_att and self.is_initializing():
      spa_att(freq, spatial)  # creates the reference's unused parameters; never run in apply
    spatial = fre_att(spatial, freq) + spatial
    second_att = spa_att if self.use_spa_att else fre_att
    freq = second_att(freq, spatial) + freq
    return _selective_sum(spatial, freq)
