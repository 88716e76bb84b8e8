"""FSMNet: two contrasts (target T2/PDFS, auxiliary T1/PD), each with a frequency and a
spatial branch, fused across contrasts (CMS-fusion) and across branches (FS-fusion).

Faithful to the reference `TwoBranch` by default, quirks included, so that converted PyTorch
weights give the same output. Module names are the reference's state_dict prefixes.
"""

import functools
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fsmnet_jax import baselines
from fsmnet_jax.blocks import CMSFusion, DownSample, FreBlock, FSFusion, ResidualGroup, UpSample
from fsmnet_jax.layers import ConvAct

ENCODER_LEVELS = ('down1', 'down2', 'down3', 'neck')
DECODER_LEVELS = ('up1', 'up2', 'up3')
DOWNSAMPLING_FACTOR = 8  # three 2x downsamplings
NUM_FS_FUSIONS = 2 * (len(ENCODER_LEVELS) + len(DECODER_LEVELS))  # after each stage and its _mo
NUM_CMS_FUSIONS = 1 + len(ENCODER_LEVELS)  # per branch: after the head and each encoder _mo


class Stage(nn.Module):
  """One FSFE step of one branch: optional resampling ('down' / 'up'), then the branch block."""
  frequency: bool
  resample: str | None = None
  num_res_blocks: int = 2

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.resample == 'down':
      x = DownSample(name='resample')(x)
    elif self.resample == 'up':
      x = UpSample(name='resample')(x)
    if self.frequency:
      return FreBlock(name='block')(x)
    return ResidualGroup(self.num_res_blocks, name='block')(x)


def _check_inputs(target_under: jax.Array, aux: jax.Array) -> None:
  for name, x in (('target_under', target_under), ('aux', aux)):
    if x.ndim != 4 or x.shape[-1] != 1:
      raise ValueError(f'FSMNet expects {name} of shape (batch, height, width, 1) (NHWC, one '
                       f'channel); got shape {tuple(x.shape)}.')
  if target_under.shape != aux.shape:
    raise ValueError(f'target_under and aux must have the same shape; got '
                     f'{tuple(target_under.shape)} and {tuple(aux.shape)}.')
  height, width = target_under.shape[1:3]
  if height % DOWNSAMPLING_FACTOR or width % DOWNSAMPLING_FACTOR or not height or not width:
    raise ValueError(f'FSMNet needs image sides divisible by {DOWNSAMPLING_FACTOR} (three 2x '
                     f'downsamplings); got {height}x{width}. Crop or zero-pad the images.')


class FSMNet(nn.Module):
  """Frequency and Spatial Mutual learning Network (MICCAI 2024).

  `apply(variables, target_under, aux)` takes the zero-filled undersampled target contrast and
  the fully-sampled auxiliary contrast, each (B, H, W, 1), and returns {'img_out': spatial
  branch, 'img_fre': frequency branch} (both (B, H, W, 1); both are residuals added to
  `target_under`). `img_out` is the reconstruction.

  Ablations (paper Table 2): `use_frequency_branch=False` drops both frequency branches and
  FS-fusion (then 'img_fre' is absent; set `use_fs_fusion=False` too); `use_cms_fusion=False`
  and `use_fs_fusion=False` replace those fusions by a plain sum. `use_spa_att=True` gives the
  second FS-fusion attention its own weights, which the reference creates but never uses.
  """
  num_features: int = 64
  num_res_blocks: int = 2
  num_heads: int = 8
  use_frequency_branch: bool = True
  use_cms_fusion: bool = True
  use_fs_fusion: bool = True
  use_spa_att: bool = False

  def __post_init__(self):
    if self.use_fs_fusion and self.num_features % self.num_heads:
      raise ValueError(f'num_features ({self.num_features}) must be divisible by num_heads '
                       f'({self.num_heads}).')
    if self.use_fs_fusion and not self.use_frequency_branch:
      raise ValueError('use_fs_fusion=True fuses the frequency branch into the spatial one and '
                       'needs use_frequency_branch=True.')
    super().__post_init__()

  @nn.compact
  def __call__(self, target_under: jax.Array, aux: jax.Array) -> dict[str, jax.Array]:
    _check_inputs(target_under, aux)
    outputs = {}
    freq_features = None
    if self.use_frequency_branch:
      aux_freq = self._aux_encoder(aux, frequency=True)
      residual, freq_features = self._target_frequency_unet(target_under, aux_freq)
      outputs['img_fre'] = residual + target_under
    aux_spatial = self._aux_encoder(aux, frequency=False)
    residual = self._target_spatial_unet(target_under, aux_spatial, freq_features)
    return {'img_out': residual + target_under, **outputs}

  # Submodule factories; their names are the reference's state_dict prefixes.

  def _stage(self, level: str, frequency: bool, aux: bool = False, mo: bool = False) -> Stage:
    name = level + ('_fre' if frequency else '') + ('_mo' if mo else '') + ('_T1' if aux else '')
    resample = None if mo or level == 'neck' else level.rstrip('0123456789')
    return Stage(frequency, resample, self.num_res_blocks, name=name)

  def _head(self, frequency: bool, aux: bool = False) -> ConvAct:
    name = 'head' + ('_fre' if frequency else '') + ('_T1' if aux else '')
    return ConvAct(self.num_features, 3, name=name)

  def _cms_fusion(self, frequency: bool, index: int) -> Callable[[jax.Array, jax.Array], jax.Array]:
    if not self.use_cms_fusion:
      return lambda aux, target: aux + target
    return CMSFusion(name=f'conv_fuse_{"fre" if frequency else "spa"}_{index}')

  def _fs_fusion(self, index: int) -> Callable[[jax.Array | None, jax.Array], jax.Array]:
    if not self.use_frequency_branch:
      return lambda freq, spatial: spatial
    if not self.use_fs_fusion:
      return lambda freq, spatial: freq + spatial
    return FSFusion(self.num_heads, self.use_spa_att, name=f'conv_fuse_{index}')

  # The three networks.

  def _aux_encoder(self, aux: jax.Array, frequency: bool) -> list[jax.Array]:
    """Encodes the auxiliary contrast; returns the head and the four `_mo` outputs."""
    x = self._head(frequency, aux=True)(aux)
    features = [x]
    for level in ENCODER_LEVELS:
      x = self._stage(level, frequency, aux=True)(x)
      x = self._stage(level, frequency, aux=True, mo=True)(x)
      features.append(x)
    return features

  def _target_frequency_unet(self, x: jax.Array, aux_features: list[jax.Array]
                             ) -> tuple[jax.Array, list[jax.Array]]:
    """Returns the frequency branch's residual image and the NUM_FS_FUSIONS features FS-fusion takes."""
    x = self._cms_fusion(True, 0)(aux_features[0], self._head(True)(x))
    skips = [x]
    for_fs_fusion = []
    for i, level in enumerate(ENCODER_LEVELS, start=1):
      stage_out = self._stage(level, True)(x)
      mo = self._stage(level, True, mo=True)(stage_out)
      x = self._cms_fusion(True, i)(aux_features[i], mo)
      if level == 'neck':
        x = x + skips[-1]
      # QUIRK kept for parity: the spatial branch is given the CMS-fused `_mo` feature at
      # down1 (and neck, after its skip), but the un-fused one at down2 and down3.
      for_fs_fusion += [stage_out, mo if level in ('down2', 'down3') else x]
      skips.append(x)
    for level, skip in zip(DECODER_LEVELS, reversed(skips[:3])):
      stage_out = self._stage(level, True)(x)
      x = self._stage(level, True, mo=True)(stage_out) + skip
      for_fs_fusion += [stage_out, x]
    return ConvAct(1, 3, name='tail_fre')(x), for_fs_fusion

  def _target_spatial_unet(self, x: jax.Array, aux_features: list[jax.Array],
                           freq_features: list[jax.Array] | None) -> jax.Array:
    """Returns the spatial branch's residual image."""
    freq_features = freq_features or [None] * NUM_FS_FUSIONS
    freq_features = iter(enumerate(freq_features))

    def fs_fusion(spatial):
      index, freq = next(freq_features)
      return self._fs_fusion(index)(freq, spatial)

    head = self._head(False)(x)
    x = self._cms_fusion(False, 0)(aux_features[0], head)
    skips = []  # the raw `_mo` outputs: the spatial skips bypass both fusions
    for i, level in enumerate(ENCODER_LEVELS, start=1):
      x = fs_fusion(self._stage(level, False)(x))
      mo = self._stage(level, False, mo=True)(x)
      if level == 'neck':
        mo = mo + skips[-1]
      skips.append(mo)
      x = self._cms_fusion(False, i)(aux_features[i], fs_fusion(mo))
    for level, skip in zip(DECODER_LEVELS, (skips[1], skips[0], head)):
      x = fs_fusion(self._stage(level, False)(x))
      x = fs_fusion(self._stage(level, False, mo=True)(x) + skip)
    return ConvAct(1, 3, name='tail')(x)


FSMNetTiny = functools.partial(FSMNet, num_features=8, num_res_blocks=1, num_heads=2)


MODEL_NAMES = ('fsmnet', 'mdunet')


def build_model(config: Mapping[str, Any]) -> nn.Module:
  """`config.model_name`'s network (a ConfigDict or its dict): FSMNet(**config.model), or the
  paper's MDUNet baseline, which takes only config.model.num_features (its first level's
  width). Runs of before model_name existed are FSMNet's."""
  model_name = config.get('model_name', 'fsmnet')
  if model_name == 'fsmnet':
    return FSMNet(**config['model'])
  if model_name == 'mdunet':
    return baselines.MDUNet(num_features=config['model']['num_features'])
  raise ValueError(f'config.model_name={model_name!r}: use one of {", ".join(MODEL_NAMES)}')


def apply_in_dtype(apply_fn: Callable, params: Any, target_under: jax.Array, aux: jax.Array,
                   compute_dtype: jnp.dtype, **kwargs: Any) -> dict[str, jax.Array]:
  """The network's outputs with its parameters and inputs in `compute_dtype` (bfloat16:
  mixed precision; the FFT blocks compute in float32 themselves), returned in that dtype."""
  cast = lambda x: x.astype(compute_dtype)
  return apply_fn({'params': jax.tree_util.tree_map(cast, params)}, cast(target_under),
                  cast(aux), **kwargs)


def size_multiple(model_name: str) -> int:
  """What image sides must be a multiple of for `model_name`'s network."""
  return baselines.SIZE_MULTIPLE if model_name == 'mdunet' else DOWNSAMPLING_FACTOR


def count_params(variables) -> int:
  """Number of scalars in a parameter tree (works on arrays and on `jax.eval_shape` results)."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(variables))


def init_variables(model: nn.Module, rng: jax.Array) -> dict:
  """Initial variables of `model` (PyTorch's initialisation), computed op by op on a 16x16
  input (the least size of every network here).

  Parameter shapes do not depend on the image size. Un-jitted on purpose: XLA:CPU takes
  ~100 s to compile the ~800 separate random samplers of a jitted init, eager takes ~10 s
  the first time and <1 s after, with the same values.
  """
  side = max(DOWNSAMPLING_FACTOR, baselines.SIZE_MULTIPLE)
  dummy = jnp.zeros((1, side, side, 1), jnp.float32)
  return model.init(rng, dummy, dummy)


@functools.lru_cache(maxsize=16)
def abstract_params(model: nn.Module) -> dict:
  """`model`'s parameter tree as `jax.ShapeDtypeStruct`s (no compute; traced once per model:
  tracing the whole model takes seconds). Shared: do not modify it."""
  return jax.eval_shape(functools.partial(init_variables, model), jax.random.key(0))['params']


def infer_model_from_params(variables: Mapping[str, Any], use_spa_att: bool = False) -> FSMNet:
  """The `FSMNet` whose parameter tree is `variables['params']` (or `variables`).

  `use_spa_att` changes no parameter, so it cannot be read from them."""
  params = variables['params'] if 'params' in variables else variables
  try:
    num_features = int(np.shape(params['head']['conv']['kernel'])[-1])
    res_blocks = [k for k in params['down1']['block'] if k.startswith('res_block_')]
  except (KeyError, TypeError) as e:
    raise ValueError(f'not FSMNet variables: no {e} in the parameter tree') from None
  fusion = params.get('conv_fuse_0')
  return FSMNet(
      num_features=num_features, num_res_blocks=len(res_blocks),
      num_heads=int(np.shape(fusion['fre_att']['temperature'])[0]) if fusion else FSMNet.num_heads,
      use_frequency_branch='head_fre' in params, use_cms_fusion='conv_fuse_spa_0' in params,
      use_fs_fusion=fusion is not None, use_spa_att=use_spa_att)
