"""k-space sampling masks.

The fastMRI mask functions are reimplemented with the fastMRI package's constructor and call
signatures and the same use of its random generator, so that for the same shape, offset and
seed they return bit-identical masks (as numpy float32 arrays, the sampled axis at shape[-2]).
The 2-D variable-density masks serve the BraTS experiments.
"""

import contextlib
from typing import Optional, Sequence, Union

import ml_collections
import numpy as np

Seed = Optional[Union[int, tuple[int, ...]]]


class MaskFunc:
  """Samples a centre band of `num_cols * center_fraction` lines plus outer lines.

  `center_fractions[i]` goes with `accelerations[i]`; one pair is drawn per call (any pairing
  if `allow_any_combination`). Calling with `seed` makes the mask a function of the seed alone
  (fastMRI's per-volume validation masks); without, masks follow the object's own generator.
  """

  def __init__(self, center_fractions: Sequence[float], accelerations: Sequence[int],
               allow_any_combination: bool = False, seed: Optional[int] = None):
    if len(center_fractions) != len(accelerations) and not allow_any_combination:
      raise ValueError('Number of center fractions should match number of accelerations if '
                       'allow_any_combination is False.')
    self.center_fractions = center_fractions
    self.accelerations = accelerations
    self.allow_any_combination = allow_any_combination
    self.rng = np.random.RandomState(seed)

  def __call__(self, shape: Sequence[int], offset: Optional[int] = None,
               seed: Seed = None) -> tuple[np.ndarray, int]:
    """(mask broadcastable to `shape`, number of centre lines); lines along shape[-2]."""
    if len(shape) < 3:
      raise ValueError('Shape should have 3 or more dimensions')
    with self._seeded(seed):
      center, outer, num_low = self.sample_mask(shape, offset)
    return np.maximum(center, outer), num_low

  @contextlib.contextmanager
  def _seeded(self, seed: Seed):
    if seed is None:
      yield
      return
    saved = self.rng.get_state()
    self.rng.seed(seed)
    try:
      yield
    finally:
      self.rng.set_state(saved)

  def choose_acceleration(self) -> tuple[float, int]:
    if self.allow_any_combination:
      return self.rng.choice(self.center_fractions), self.rng.choice(self.accelerations)
    index = self.rng.randint(len(self.center_fractions))
    return self.center_fractions[index], self.accelerations[index]

  def sample_mask(self, shape: Sequence[int], offset: Optional[int]
                  ) -> tuple[np.ndarray, np.ndarray, int]:
    """(centre mask, outer mask, number of centre lines), each mask shaped for `shape`."""
    num_cols = shape[-2]
    center_fraction, acceleration = self.choose_acceleration()
    num_low = round(num_cols * center_fraction)
    center = _as_line_mask(_center_lines(num_cols, num_low), shape)
    outer = _as_line_mask(self.outer_lines(num_cols, acceleration, offset, num_low), shape)
    return center, outer, num_low

  def outer_lines(self, num_cols: int, acceleration: float, offset: Optional[int],
                  num_low: int) -> np.ndarray:
    """1-D mask of the lines sampled outside the centre band."""
    raise NotImplementedError


def _center_lines(num_cols: int, num_low: int) -> np.ndarray:
  mask = np.zeros(num_cols, dtype=np.float32)
  start = (num_cols - num_low + 1) // 2
  mask[start:start + num_low] = 1
  return mask


def _as_line_mask(lines: np.ndarray, shape: Sequence[int]) -> np.ndarray:
  mask_shape = [1] * len(shape)
  mask_shape[-2] = shape[-2]
  return lines.reshape(mask_shape).astype(np.float32)


class RandomMaskFunc(MaskFunc):
  """Outer lines drawn independently, so that the expected total is num_cols / acceleration."""

  def outer_lines(self, num_cols, acceleration, offset, num_low):
    probability = (num_cols / acceleration - num_low) / (num_cols - num_low)
    return self.rng.uniform(size=num_cols) < probability


class EquiSpacedMaskFunc(MaskFunc):
  """Every `acceleration`-th line from `offset` (random if None); the centre comes on top."""

  def outer_lines(self, num_cols, acceleration, offset, num_low):
    if offset is None:
      offset = self.rng.randint(0, high=round(acceleration))
    mask = np.zeros(num_cols, dtype=np.float32)
    mask[offset::acceleration] = 1
    return mask


class EquispacedMaskFractionFunc(MaskFunc):
  """Equispaced outer lines with the spacing adjusted for the centre band, so the total
  acceleration matches the nominal one (spacing is rounded, as fastMRI's public masks are)."""

  def outer_lines(self, num_cols, acceleration, offset, num_low):
    spacing = acceleration * (num_low - num_cols) / (num_low * acceleration - num_cols)
    if offset is None:
      offset = self.rng.randint(0, high=round(spacing))
    mask = np.zeros(num_cols)
    mask[np.around(np.arange(offset, num_cols - 1, spacing)).astype(np.uint)] = 1.0
    return mask


class MagicMaskFunc(MaskFunc):
  """Equispaced lines offset differently on the two halves of k-space, exploiting conjugate
  symmetry (Defazio 2019, "Offset Sampling Improves Deep Learning based Accelerated MRI")."""

  def outer_lines(self, num_cols, acceleration, offset, num_low):
    if acceleration < 1:
      raise ValueError(f'no outer lines left to sample for {num_cols} columns at this '
                       'acceleration and centre fraction')
    if offset is None:
      offset = self.rng.randint(0, high=acceleration)
    positive_offset, negative_offset = (offset + 1, offset + 2) if offset % 2 == 0 else (
        offset + 2, offset - 1)
    positive = np.zeros((num_cols + 1) // 2, dtype=np.float32)
    negative = np.zeros(num_cols - (num_cols + 1) // 2, dtype=np.float32)
    positive[positive_offset::acceleration] = 1
    negative[negative_offset::acceleration] = 1
    return np.fft.fftshift(np.concatenate([positive, negative[::-1]]))


class MagicMaskFractionFunc(MagicMaskFunc):
  """`MagicMaskFunc` with the spacing chosen so that the total matches the acceleration."""

  def sample_mask(self, shape, offset):
    num_cols = shape[-2]
    center_fraction, acceleration = self.choose_acceleration()
    target = round(num_cols / acceleration)
    num_low = max(min(round(num_cols * center_fraction), target), 1)
    outer_target = target - num_low
    spacing = round(num_cols / outer_target) if outer_target > 0 else 0
    center = _as_line_mask(_center_lines(num_cols, num_low), shape)
    outer = _as_line_mask(self.outer_lines(num_cols, spacing, offset, num_low), shape)
    return center, outer, num_low


MASK_TYPES = {
    'random': RandomMaskFunc,
    'equispaced': EquiSpacedMaskFunc,
    'equispaced_fraction': EquispacedMaskFractionFunc,
    'magic': MagicMaskFunc,
    'magic_fraction': MagicMaskFractionFunc,
}


def create_mask_for_mask_type(mask_type: str, center_fractions: Sequence[float],
                              accelerations: Sequence[int]) -> MaskFunc:
  """The fastMRI mask function named `mask_type` ('random', 'equispaced', ...)."""
  if mask_type not in MASK_TYPES:
    raise ValueError(f'unknown mask type {mask_type!r}; choose from {sorted(MASK_TYPES)}')
  return MASK_TYPES[mask_type](center_fractions, accelerations)


def cartesian_mask(mask_func: MaskFunc, image_shape: tuple[int, int], axis: int = 1,
                   seed: Seed = None, offset: Optional[int] = None) -> np.ndarray:
  """A 2-D (H, W) mask of full lines: `mask_func` samples positions along `axis` (0 rows of
  k-space = phase encoding along H, 1 = along W), every line fully measured."""
  lines = image_shape[axis]
  mask, _ = mask_func((1, lines, 1), offset=offset, seed=seed)
  mask = mask.reshape(lines)
  return np.broadcast_to(mask[:, None] if axis == 0 else mask[None, :], image_shape).astype(
      np.float32)


def gaussian_mask(image_shape: tuple[int, int], acceleration: float, center_fraction: float = 0.08,
                  sigma_fraction: float = 0.25, seed: Seed = None) -> np.ndarray:
  """2-D variable-density random mask: a fully-sampled central square (side `center_fraction`
  of each dimension) plus points drawn without replacement with a Gaussian density (std
  `sigma_fraction` of each side), so that exactly round(H*W/acceleration) points are sampled."""
  height, width = image_shape
  rng = np.random.default_rng(seed)
  mask = np.zeros(image_shape, np.float32)
  ch, cw = max(1, round(height * center_fraction)), max(1, round(width * center_fraction))
  mask[(height - ch) // 2:(height - ch) // 2 + ch, (width - cw) // 2:(width - cw) // 2 + cw] = 1
  total = round(height * width / acceleration)
  remaining = total - int(mask.sum())
  if remaining < 0:
    raise ValueError(f'the centre ({ch}x{cw}) alone exceeds {total} samples for '
                     f'acceleration {acceleration}; lower center_fraction')
  y = (np.arange(height) - height / 2) / (sigma_fraction * height)
  x = (np.arange(width) - width / 2) / (sigma_fraction * width)
  density = np.exp(-0.5 * (y[:, None] ** 2 + x[None, :] ** 2)) * (1 - mask)
  chosen = rng.choice(height * width, size=remaining, replace=False,
                      p=(density / density.sum()).ravel())
  mask.ravel()[chosen] = 1
  return mask


def poisson_disc_mask(image_shape: tuple[int, int], acceleration: float,
                      center_fraction: float = 0.08, growth: float = 3.0, seed: Seed = None,
                      passes: int = 6) -> np.ndarray:
  """2-D variable-density Poisson-disc mask: points no closer than r(k) = r0 * (1 + growth *
  |k| / k_max) to each other (denser at the centre, never clumped), plus a fully-sampled
  central square; r0 is tuned so that about H*W/acceleration points are sampled (within ~2%).

  Dart throwing in a fixed random order: about 1 s per 240 px mask on a 2-core CPU.
  """
  height, width = image_shape
  rng = np.random.default_rng(seed)
  rows, cols = np.divmod(rng.permutation(height * width), width)
  ky = (np.arange(height) - height / 2) / (height / 2)
  kx = (np.arange(width) - width / 2) / (width / 2)
  profile = (1 + growth * np.sqrt(ky[:, None] ** 2 + kx[None, :] ** 2))[rows, cols]
  center = np.zeros(image_shape, bool)
  ch, cw = max(1, round(height * center_fraction)), max(1, round(width * center_fraction))
  center[(height - ch) // 2:(height - ch) // 2 + ch, (width - cw) // 2:(width - cw) // 2 + cw] = True
  target = round(height * width / acceleration)

  def throw(r0: float) -> np.ndarray:
    pad = int(np.ceil(r0 * (1 + growth * np.sqrt(2)))) + 1
    taken = np.zeros((height + 2 * pad, width + 2 * pad), bool)
    taken[pad:-pad, pad:-pad] = center
    for y, x, r in zip(rows.tolist(), cols.tolist(), (r0 * profile).tolist()):
      reach = int(r)
      if reach:
        window = taken[y + pad - reach:y + pad + reach + 1, x + pad - reach:x + pad + reach + 1]
        near_y, near_x = np.nonzero(window)
        if near_y.size and np.min((near_y - reach) ** 2 + (near_x - reach) ** 2) < r * r:
          continue
      taken[y + pad, x + pad] = True
    return taken[pad:-pad, pad:-pad]

  # The count falls roughly as 1 / r0^2: a few multiplicative updates converge.
  r0, best = 1.5, None
  for _ in range(passes):
    mask = throw(r0)
    if best is None or abs(mask.sum() - target) < abs(best.sum() - target):
      best = mask
    if abs(mask.sum() / target - 1) < 0.01:
      break
    r0 *= np.sqrt(mask.sum() / target)
  return best.astype(np.float32)


# config.data.mask_type: fastMRI's line masks, and the 2-D variable-density ones.
SAMPLING_MASK_TYPES = (*MASK_TYPES, 'gaussian', 'poisson')


def sampling_mask(config: ml_collections.ConfigDict, shape: tuple[int, int], seed) -> np.ndarray:
  """The (rows, cols) k-space mask of `config.mask_type`: a fastMRI type samples whole lines
  at positions along `config.mask_axis` (1: columns, fastMRI's phase encoding); 'gaussian' is
  the 2-D variable-density random mask, 'poisson' the 2-D variable-density Poisson-disc one."""
  if config.mask_type == 'gaussian':
    return gaussian_mask(shape, config.acceleration, config.center_fraction, seed=seed)
  if config.mask_type == 'poisson':
    return poisson_disc_mask(shape, config.acceleration, config.center_fraction, seed=seed)
  mask_func = create_mask_for_mask_type(config.mask_type, [config.center_fraction],
                                        [config.acceleration])
  return cartesian_mask(mask_func, shape, axis=config.mask_axis, seed=seed)
