"""Demo subjects with a real brain's anatomy: the ICBM152 2009 template that nilearn ships inside
its wheel (T1, grey and white matter probability maps at 1 mm; no download), deformed, biased,
noised and given lesions per subject, so that subjects differ as patients do.

T1 is the template's own T1; T2 is made from the tissue maps with T2 weighting (CSF bright,
grey matter mid, white matter dark). Lesions are bright in T2 and dark in T1, like the edema
around a tumour. The volumes are skull-stripped, as BraTS's are. Needs the `brain` extra
(nilearn).
"""

import functools

import numpy as np
from scipy import ndimage
from scipy.spatial import transform

# Relative intensities (CSF, grey matter, white matter) of the T2-weighted image.
T2_WEIGHTS = (1.0, 0.55, 0.3)
FIELD_OF_VIEW_MM = 200  # in-plane, square: the template brain is ~140 x 175 mm
SLAB_MM = (-36.0, 64.0)  # axial slab (template z): the ventricles and the cortex above them
MAX_ROTATION_DEG = 6
MAX_SCALING = 0.06
MAX_SHIFT_MM = 4
WARP_MM = 2.5  # standard deviation of the smooth non-linear displacement
NOISE = 0.015  # Rician noise, relative to the brightest tissue


class MissingExtraError(ImportError):
  """nilearn, the `brain` extra, is not installed."""


@functools.cache
def template() -> dict[str, np.ndarray]:
  """The template's 'mask', 't1', 'gm', 'wm' and 'csf' maps (x, y, z) in [0, 1], and 'affine'."""
  try:
    from nilearn import datasets  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise MissingExtraError('the brain demo needs nilearn: pip install "fsmnet-jax[brain]"') from e
  t1 = datasets.load_mni152_template(resolution=1)
  maps = {'t1': t1.get_fdata(dtype=np.float32),
          'gm': datasets.load_mni152_gm_template(resolution=1).get_fdata(dtype=np.float32),
          'wm': datasets.load_mni152_wm_template(resolution=1).get_fdata(dtype=np.float32),
          'mask': datasets.load_mni152_brain_mask(resolution=1).get_fdata(dtype=np.float32)}
  maps['csf'] = np.clip(maps['mask'] - maps['gm'] - maps['wm'], 0, 1)
  return {**maps, 'affine': t1.affine}


def _smooth_field(shape: tuple[int, ...], rng: np.random.Generator, coarse: int = 5
                  ) -> np.ndarray:
  """A smooth random field of unit standard deviation at the coarse grid's nodes."""
  nodes = rng.normal(size=(coarse,) * len(shape))
  return ndimage.zoom(nodes, [s / coarse for s in shape], order=3, mode='nearest')


def _world_grid(shape: tuple[int, int, int]) -> np.ndarray:
  """(3, D, H, W) template-space coordinates (mm) of the demo volume's voxels: axial slices over
  SLAB_MM, rows anterior->posterior, columns right->left, as the demo's NIfTI writer lays them
  out."""
  depth, height, width = shape
  pixel = FIELD_OF_VIEW_MM / max(height, width)
  z = np.linspace(*SLAB_MM, depth)
  y = -18 + (height / 2 - 0.5 - np.arange(height)) * pixel  # the template brain's centre
  x = (width / 2 - 0.5 - np.arange(width)) * pixel
  return np.stack(np.meshgrid(x, y, z, indexing='ij')).transpose(0, 3, 2, 1)


def brain_volumes(shape: tuple[int, int, int], rng: np.random.Generator
                  ) -> dict[str, np.ndarray]:
  """T1 and T2 volumes (D, H, W) in [0, ~1] of one random subject."""
  maps = template()
  world = _world_grid(shape).reshape(3, -1)
  # Where each voxel of this subject is in the template: a random affine and a smooth warp.
  scaling = 1 + rng.uniform(-MAX_SCALING, MAX_SCALING, 3)
  tilt = rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, 3) * (1, 0.5, 0.5)  # mostly in-plane
  linear = transform.Rotation.from_euler('zyx', tilt, degrees=True).as_matrix() * scaling
  warp = np.stack([_smooth_field(shape, rng).reshape(-1) for _ in range(3)]) * WARP_MM
  moved = linear @ world + rng.uniform(-MAX_SHIFT_MM, MAX_SHIFT_MM, (3, 1)) + warp
  to_voxels = np.linalg.inv(maps['affine'])
  voxels = to_voxels[:3, :3] @ moved + to_voxels[:3, 3:]
  sampled = {name: ndimage.map_coordinates(maps[name], voxels, order=1).reshape(shape)
             for name in ('mask', 't1', 'gm', 'wm', 'csf')}
  weights = np.array(T2_WEIGHTS) * rng.uniform(0.9, 1.1, 3)
  t1 = sampled['t1']
  t2 = weights[0] * sampled['csf'] + weights[1] * sampled['gm'] + weights[2] * sampled['wm']
  t1, t2 = _add_lesions(t1, t2, sampled['wm'], rng)
  volumes = {}
  for name, volume in (('t1', t1), ('t2', t2)):
    bias = np.exp(0.12 * _smooth_field(shape, rng, coarse=3))
    clean = volume * bias * sampled['mask']
    real, imaginary = rng.normal(scale=NOISE, size=(2, *shape))
    volumes[name] = (np.hypot(clean + real, imaginary) * (sampled['mask'] > 0.5)
                     ).astype(np.float32)
  return volumes


def _add_lesions(t1: np.ndarray, t2: np.ndarray, white_matter: np.ndarray,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Up to three blurred ellipsoids in white matter: bright in T2, dark in T1."""
  candidates = np.argwhere(white_matter > 0.8)
  grid = np.indices(t1.shape)
  for _ in range(rng.integers(0, 4) if len(candidates) else 0):
    center = candidates[rng.integers(len(candidates))]
    radii = rng.uniform(1.0, 3.5, 3) * (0.5, 1, 1)  # voxels; slices are thicker than pixels
    distance = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii))
    lesion = ndimage.gaussian_filter((distance <= 1).astype(np.float32), 0.7)
    t1 = t1 * (1 - 0.5 * lesion)
    t2 = t2 + 0.6 * lesion
  return t1, t2
