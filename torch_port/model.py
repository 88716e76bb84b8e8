"""TorchFSMNet: a PyTorch FSMNet whose state_dict matches the reference `TwoBranch` key for key.

Written for this project (NCHW); it mirrors `fsmnet_jax.model.FSMNet` block for block and
loads checkpoints trained with the reference code with `strict=True`.
"""

import numpy as np
import torch
from torch import nn

from fsmnet_jax.blocks import FFT_EPS
from fsmnet_jax.layers import NON_FINITE_FILL
from fsmnet_jax.model import DECODER_LEVELS, ENCODER_LEVELS, NUM_CMS_FUSIONS, NUM_FS_FUSIONS


def from_nhwc(x: np.ndarray, dtype: torch.dtype | None = None) -> torch.Tensor:
  """An NHWC numpy array (this project's layout) as a contiguous NCHW tensor (TorchFSMNet's)."""
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(dtype)


def to_nhwc(x: torch.Tensor) -> np.ndarray:
  """An NCHW tensor as an NHWC numpy array."""
  return x.detach().cpu().numpy().transpose(0, 2, 3, 1)


def _conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool = True,
          groups: int = 1) -> nn.Conv2d:
  return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias,
                   groups=groups)


def _replace_non_finite(x: torch.Tensor) -> torch.Tensor:
  return torch.nan_to_num(x, nan=NON_FINITE_FILL, posinf=NON_FINITE_FILL, neginf=NON_FINITE_FILL)


class ConvAct(nn.Module):
  """Bias-free conv, then an optional activation (keys `layers.*`, `act.*`)."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
               act: nn.Module | None = None):
    super().__init__()
    self.layers = _conv(in_channels, out_channels, kernel_size, bias=False)
    self.act = act

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.layers(x)
    return x if self.act is None else self.act(x)


class ResBlock(nn.Module):
  def __init__(self, channels: int):
    super().__init__()
    self.layers = nn.Sequential(ConvAct(channels, channels, 3, nn.ReLU()),
                                ConvAct(channels, channels, 3))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return torch.relu(self.layers(x) + x)


class Scale(nn.Module):
  def __init__(self):
    super().__init__()
    self.scale = nn.Parameter(torch.ones(1))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x * self.scale


class ResidualGroup(nn.Module):
  def __init__(self, channels: int, num_res_blocks: int):
    super().__init__()
    blocks = [ResBlock(channels) for _ in range(num_res_blocks)]
    self.body = nn.Sequential(*blocks, ConvAct(channels, channels, 3, nn.PReLU()))
    self.re_scale = Scale()

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.body(x) + self.re_scale(x)


class DownSample(nn.Module):
  def __init__(self, channels: int):
    super().__init__()
    # nn.PixelUnshuffle orders output channels (c, dy, dx), as the reference's invPixelShuffle.
    self.layers = nn.Sequential(ConvAct(channels, channels, 3), nn.PixelUnshuffle(2),
                                ConvAct(4 * channels, channels, 1))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.layers(x)


def _upsample(channels: int) -> nn.Sequential:
  return nn.Sequential(_conv(channels, 4 * channels, 1), nn.PixelShuffle(2), nn.PReLU())


def _refine(channels: int) -> nn.Sequential:
  return nn.Sequential(_conv(channels, channels, 3), nn.LeakyReLU(0.1),
                       _conv(channels, channels, 3))


class FreBlock(nn.Module):
  def __init__(self, channels: int):
    super().__init__()
    self.fpre = _conv(channels, channels, 1)
    self.amp_fuse = _refine(channels)
    self.pha_fuse = _refine(channels)
    self.post = _conv(channels, channels, 1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    height, width = x.shape[-2:]
    spectrum = torch.fft.rfft2(self.fpre(x) + FFT_EPS)
    amp, pha = spectrum.abs(), spectrum.angle()
    amp = self.amp_fuse(amp) + amp
    pha = self.pha_fuse(pha) + pha
    rebuilt = torch.complex(amp * torch.cos(pha) + FFT_EPS, amp * torch.sin(pha) + FFT_EPS)
    y = torch.fft.irfft2(rebuilt + FFT_EPS, s=(height, width)).abs()
    return _replace_non_finite(self.post(y) + x)


class Attention(nn.Module):
  """Channel ("transposed") cross-attention: queries from x, keys and values from y."""

  def __init__(self, channels: int, num_heads: int):
    super().__init__()
    self.num_heads = num_heads
    self.temperature = nn.Parameter(torch.ones(num_heads, 1, 1))
    self.kv = _conv(channels, 2 * channels, 1, bias=False)
    self.kv_dwconv = _conv(2 * channels, 2 * channels, 3, bias=False, groups=2 * channels)
    self.q = _conv(channels, channels, 1, bias=False)
    self.q_dwconv = _conv(channels, channels, 3, bias=False, groups=channels)
    self.project_out = _conv(channels, channels, 1, bias=False)

  def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    k, v = self.kv_dwconv(self.kv(y)).chunk(2, dim=1)
    q = self.q_dwconv(self.q(x))
    q, k, v = (t.reshape(b, self.num_heads, c // self.num_heads, h * w) for t in (q, k, v))
    q = nn.functional.normalize(q, dim=-1)
    k = nn.functional.normalize(k, dim=-1)
    weights = (q @ k.transpose(-2, -1) * self.temperature).softmax(dim=-1)
    return self.project_out((weights @ v).reshape(b, c, h, w))


def _gate(channels: int) -> nn.Sequential:
  return nn.Sequential(_conv(2 * channels, channels, 3), _conv(channels, 2 * channels, 3),
                       nn.Sigmoid())


def _selective_sum(gate: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
  gate_a, gate_b = gate(torch.cat([a, b], dim=1)).chunk(2, dim=1)
  return _replace_non_finite(a * gate_a + b * gate_b)


class CMSFusion(nn.Module):
  """The reference's Modality_FuseBlock6, called as (aux, target)."""

  def __init__(self, channels: int):
    super().__init__()
    self.t1 = _conv(channels, channels, 3)
    self.t2 = _conv(channels, channels, 3)
    self.fuse = _gate(channels)

  def forward(self, aux: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return _selective_sum(self.fuse, self.t1(aux), self.t2(target))


class FSFusion(nn.Module):
  """The reference's FuseBlock7, called as (frequency, spatial); `fre` convolves the spatial
  input and both attentions are `fre_att` unless `use_spa_att` (see fsmnet_jax.blocks)."""

  def __init__(self, channels: int, num_heads: int, use_spa_att: bool = False):
    super().__init__()
    self.fre = _conv(channels, channels, 3)
    self.spa = _conv(channels, channels, 3)
    self.fre_att = Attention(channels, num_heads)
    self.spa_att = Attention(channels, num_heads)
    self.fuse = _gate(channels)
    self.use_spa_att = use_spa_att

  def forward(self, freq: torch.Tensor, spatial: torch.Tensor) -> torch.Tensor:
    spatial, freq = self.fre(spatial), self.spa(freq)
    spatial = self.fre_att(spatial, freq) + spatial
    freq = (self.spa_att if self.use_spa_att else self.fre_att)(freq, spatial) + freq
    return _selective_sum(self.fuse, spatial, freq)


class TorchFSMNet(nn.Module):
  """FSMNet in PyTorch, NCHW; `forward(main, aux)` returns {'img_out', 'img_fre'}.

  Same attributes and semantics as `fsmnet_jax.model.FSMNet`; the default is the reference.
  """

  def __init__(self, num_features: int = 64, num_res_blocks: int = 2, num_heads: int = 8,
               use_frequency_branch: bool = True, use_cms_fusion: bool = True,
               use_fs_fusion: bool = True, use_spa_att: bool = False):
    super().__init__()
    if use_fs_fusion and not use_frequency_branch:
      raise ValueError('use_fs_fusion=True needs use_frequency_branch=True.')
    self.num_res_blocks = num_res_blocks
    self.use_frequency_branch = use_frequency_branch
    self.use_cms_fusion = use_cms_fusion
    self.use_fs_fusion = use_fs_fusion
    f = num_features
    # Registration order follows the reference, so state_dict() lists keys in its order.
    branches = [('_fre', ''), ('', '')] if use_frequency_branch else [('', '')]
    for branch, t1 in branches:
      self._add_branch(f, branch, t1, decoder=True)
    if use_fs_fusion:
      self.conv_fuse = nn.ModuleList(FSFusion(f, num_heads, use_spa_att)
                                     for _ in range(NUM_FS_FUSIONS))
    for branch, _ in branches:
      self._add_branch(f, branch, '_T1', decoder=False)
    if use_cms_fusion:
      for branch in ('fre', 'spa') if use_frequency_branch else ('spa',):
        setattr(self, f'conv_fuse_{branch}',
                nn.ModuleList(CMSFusion(f) for _ in range(NUM_CMS_FUSIONS)))

  def _add_branch(self, f: int, branch: str, t1: str, decoder: bool) -> None:
    def block():
      return FreBlock(f) if branch else ResidualGroup(f, self.num_res_blocks)

    setattr(self, f'head{branch}{t1}', nn.Sequential(ConvAct(1, f, 3, nn.PReLU())))
    for level in ENCODER_LEVELS + (DECODER_LEVELS if decoder else ()):
      resample = ([] if level == 'neck' else
                  [DownSample(f)] if level.startswith('down') else [_upsample(f)])
      setattr(self, f'{level}{branch}{t1}', nn.Sequential(*resample, block()))
      mo = f'{level}_mo{t1}' if not branch else f'{level}{branch}_mo{t1}'
      setattr(self, mo, nn.Sequential(block()))
    if decoder:
      setattr(self, f'tail{branch}', nn.Sequential(ConvAct(f, 1, 3, nn.PReLU())))

  def _stage(self, level: str, branch: str, mo: bool = False, t1: str = '') -> nn.Module:
    if mo:
      return getattr(self, f'{level}_mo{t1}' if not branch else f'{level}{branch}_mo{t1}')
    return getattr(self, f'{level}{branch}{t1}')

  def _cms(self, branch: str, index: int, aux: torch.Tensor, target: torch.Tensor):
    if not self.use_cms_fusion:
      return aux + target
    return getattr(self, f'conv_fuse_{branch}')[index](aux, target)

  def _fs(self, index: int, freq: torch.Tensor | None, spatial: torch.Tensor) -> torch.Tensor:
    if not self.use_frequency_branch:
      return spatial
    if not self.use_fs_fusion:
      return freq + spatial
    return self.conv_fuse[index](freq, spatial)

  def _aux_encoder(self, aux: torch.Tensor, branch: str) -> list[torch.Tensor]:
    x = getattr(self, f'head{branch}_T1')(aux)
    features = [x]
    for level in ENCODER_LEVELS:
      x = self._stage(level, branch, mo=True, t1='_T1')(self._stage(level, branch, t1='_T1')(x))
      features.append(x)
    return features

  def _frequency_unet(self, main, aux_features):
    x = self._cms('fre', 0, aux_features[0], self.head_fre(main))
    skips, for_fs = [x], []
    for i, level in enumerate(ENCODER_LEVELS, start=1):
      stage_out = self._stage(level, '_fre')(x)
      mo = self._stage(level, '_fre', mo=True)(stage_out)
      x = self._cms('fre', i, aux_features[i], mo)
      if level == 'neck':
        x = x + skips[-1]
      for_fs += [stage_out, mo if level in ('down2', 'down3') else x]  # the reference's wiring
      skips.append(x)
    for level, skip in zip(DECODER_LEVELS, reversed(skips[:3])):
      stage_out = self._stage(level, '_fre')(x)
      x = self._stage(level, '_fre', mo=True)(stage_out) + skip
      for_fs += [stage_out, x]
    return self.tail_fre(x), for_fs

  def _spatial_unet(self, main, aux_features, freq_features):
    freq_features = iter(freq_features or [None] * NUM_FS_FUSIONS)
    index = iter(range(NUM_FS_FUSIONS))

    def fs(spatial):
      return self._fs(next(index), next(freq_features), spatial)

    head = self.head(main)
    x = self._cms('spa', 0, aux_features[0], head)
    skips = []
    for i, level in enumerate(ENCODER_LEVELS, start=1):
      x = fs(self._stage(level, '')(x))
      mo = self._stage(level, '', mo=True)(x)
      if level == 'neck':
        mo = mo + skips[-1]
      skips.append(mo)
      x = self._cms('spa', i, aux_features[i], fs(mo))
    for level, skip in zip(DECODER_LEVELS, (skips[1], skips[0], head)):
      x = fs(self._stage(level, '')(x))
      x = fs(self._stage(level, '', mo=True)(x) + skip)
    return self.tail(x)

  def forward(self, main: torch.Tensor, aux: torch.Tensor) -> dict[str, torch.Tensor]:
    outputs = {}
    freq_features = None
    if self.use_frequency_branch:
      residual, freq_features = self._frequency_unet(main, self._aux_encoder(aux, '_fre'))
      outputs['img_fre'] = residual + main
    residual = self._spatial_unet(main, self._aux_encoder(aux, ''), freq_features)
    return {'img_out': residual + main, **outputs}
