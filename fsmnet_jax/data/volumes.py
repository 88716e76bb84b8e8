"""Pairs of NIfTI volumes (a target contrast and the reference that guides it), whatever data set
they come from: finding them in subject folders, loading both as axial slices on the target's
voxel grid, caching the decoded pair, choosing slices, and the subject-level split.

Volumes are reoriented to RAS from their affine, so axial slices are taken along the superior
axis whatever the storage order. A reference stored on another voxel grid than its target (IXI's
sagittal T1 against its axial T2) is, where the data set allows it, resampled onto the target's
grid through the two affines: alignment by the scanner coordinates in the headers, not a
registration, so motion between the two scans stays. Target slices the reference does not reach
are left out (`covered_slices`).
"""

import dataclasses
import fnmatch
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Callable, NamedTuple

import nibabel as nib
import numpy as np
from scipy import ndimage

from fsmnet_jax.data import DataError, transforms
from fsmnet_jax.files import (StoragePath, as_path, default_cache_dir, is_url, local_copy,
                              write_atomically)

# Smaller slices are no MR image (clinical matrices start at 64): a wrong axis order, a mask.
MIN_SLICE_SIZE = 8
# Voxel grids whose affines differ by less than this (mm, per entry) are one grid.
GRID_TOLERANCE_MM = 1e-3


@dataclasses.dataclass(frozen=True)
class VolumePair:
  """One subject's target volume and the reference volume that guides its reconstruction."""
  name: str
  target: StoragePath
  reference: StoragePath


def find_in_subject_folders(root: str | os.PathLike, target: Callable[[str], bool],
                            reference: Callable[[str], bool], target_label: str,
                            reference_label: str) -> list[VolumePair]:
  """The pair of every subject folder under `root`, sorted by name, the files chosen by their
  names. Folders with neither are ignored; a folder with only one, or with two candidates for
  one, is an error naming the folder and the files (labels say what was looked for). `root`
  may be a bucket URL."""
  root = as_path(root)
  if not root.is_dir():
    raise DataError(f'{root}: no such data folder')
  pairs = []
  for folder in sorted(p for p in root.iterdir() if p.is_dir()):
    names = sorted(f.name for f in folder.iterdir() if f.is_file())
    found = {label: [n for n in names if matches(n)]
             for label, matches in ((target_label, target), (reference_label, reference))}
    if not any(found.values()):
      continue
    for label, files in found.items():
      if len(files) != 1:
        raise DataError(f'{folder}: expected one {label}, found {len(files)}: {files}')
    pairs.append(VolumePair(folder.name, folder / found[target_label][0],
                            folder / found[reference_label][0]))
  if not pairs:
    raise DataError(f'{root}: no subject folders with a {target_label} and a {reference_label}')
  return pairs


def find_glob_pairs(root: str | os.PathLike, target_glob: str, reference_glob: str
                    ) -> list[VolumePair]:
  """`config.data.dataset='nifti_pairs'`: subject folders under `root`, each with one file
  matching `target_glob` and one matching `reference_glob` (shell patterns, e.g. '*_t2.nii.gz')."""
  for key, pattern in (('target_glob', target_glob), ('reference_glob', reference_glob)):
    if not pattern:
      raise DataError(f'config.data.{key}: give the file name pattern of the '
                      f'{key.split("_")[0]} volume in each subject folder, e.g. "*_t2.nii.gz"')
  return find_in_subject_folders(
      root, lambda name: fnmatch.fnmatch(name, target_glob),
      lambda name: fnmatch.fnmatch(name, reference_glob),
      f'target volume ({target_glob})', f'reference volume ({reference_glob})')


class Volume(NamedTuple):
  """A NIfTI file's voxels (a finite real 3-D float32 array), voxel-to-world affine and header."""
  voxels: np.ndarray
  affine: np.ndarray
  header: nib.Nifti1Header


def read_volume(path: StoragePath) -> Volume:
  """The NIfTI file at `path`, else a DataError naming the file and the problem. A file in a
  bucket is copied to a local temporary folder to be read (nibabel reads files; `cached_pair`
  keeps the decoded result), once: callers that need the header too take it from here."""
  try:
    with local_copy(path) as local:
      image = nib.load(str(local))
      shape, dtype = image.shape, image.get_data_dtype()
      if 0 not in shape and dtype.kind in 'biuf':
        data = np.asarray(image.dataobj, dtype=np.float32)
  except FileNotFoundError:
    raise DataError(f'{path}: no such file') from None
  except Exception as e:  # nibabel raises many types for damaged files
    raise DataError(f'{path}: not a readable NIfTI volume ({type(e).__name__}: '
                    f'{str(e).splitlines()[0][:160] if str(e) else "truncated?"})') from e
  if 0 in shape:
    raise DataError(f'{path}: holds no voxels (shape {shape})')
  if dtype.kind not in 'biuf':  # complex, RGB and other structured voxels
    raise DataError(f'{path}: voxels of type {dtype}; expected a real-valued magnitude image')
  while data.ndim > 3 and data.shape[-1] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise DataError(f'{path}: expected a 3-D volume, got shape {data.shape}')
  if not np.isfinite(data).all():
    raise DataError(f'{path}: {int((~np.isfinite(data)).sum())} NaN/inf voxels')
  affine = image.affine
  if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
    raise DataError(f'{path}: its voxel-to-world affine is singular or not finite '
                    f'({np.round(affine[:3], 4).tolist()})')
  return Volume(data, affine, image.header)


def axial_slices(data: np.ndarray, affine: np.ndarray, path: Path) -> np.ndarray:
  """(slices, rows, cols): axial slices of a volume stored with `affine`, rows
  anterior->posterior, cols right->left (radiological view), whatever its axis order."""
  orientation = nib.orientations
  to_ras = orientation.ornt_transform(orientation.io_orientation(affine),
                                      orientation.axcodes2ornt('RAS'))
  ras = orientation.apply_orientation(data, to_ras)
  if min(ras.shape[:2]) < MIN_SLICE_SIZE:
    raise DataError(f'{path}: slices of {ras.shape[0]}x{ras.shape[1]} voxels; the model needs '
                    f'at least {MIN_SLICE_SIZE}x{MIN_SLICE_SIZE}')
  # RAS (x right, y anterior, z superior) -> (z, y reversed, x reversed).
  return np.ascontiguousarray(ras.transpose(2, 1, 0)[:, ::-1, ::-1])


def load_axial_slices(path: Path) -> np.ndarray:
  """(slices, rows, cols) float32: the axial slices of a NIfTI file (see `axial_slices`)."""
  volume = read_volume(path)
  return axial_slices(volume.voxels, volume.affine, path)


def to_file_layout(slices: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """Inverse of `load_axial_slices`: (slices, rows, cols) back to the axis order and directions
  of a file with this `affine`."""
  ras = slices[:, ::-1, ::-1].transpose(2, 1, 0)
  orientation = nib.orientations
  to_file = orientation.ornt_transform(orientation.axcodes2ornt('RAS'),
                                       orientation.io_orientation(affine))
  return orientation.apply_orientation(ras, to_file)


def resample_onto(data: np.ndarray, affine: np.ndarray, grid_shape: tuple[int, ...],
                  grid_affine: np.ndarray) -> tuple[np.ndarray, float]:
  """(`data` resampled onto the voxel grid of `grid_shape` and `grid_affine` by linear
  interpolation through the two affines, zero outside `data`; how many of the grid's voxels
  fall inside `data`)."""
  voxel_to_voxel = np.linalg.inv(affine) @ grid_affine  # grid voxel -> data voxel
  coordinates = np.indices(grid_shape, dtype=np.float32).reshape(3, -1)
  mapped = voxel_to_voxel[:3, :3] @ coordinates + voxel_to_voxel[:3, 3:]
  inside = np.all((mapped > -0.5) & (mapped < np.array(data.shape)[:, None] - 0.5), axis=0)
  resampled = ndimage.map_coordinates(data, mapped, order=1, mode='constant', cval=0.0)
  return resampled.reshape(grid_shape).astype(np.float32), int(inside.sum())


def load_pair(pair: VolumePair, align_by_headers: bool) -> tuple[np.ndarray, np.ndarray]:
  """(reference, target) axial slices on the target's voxel grid. A reference on another grid
  is resampled onto it if `align_by_headers`; else volumes of one shape are taken as one grid
  and others refused (BraTS ships co-registered pairs)."""
  target = read_volume(pair.target)
  return pair_on_target_grid(pair, read_volume(pair.reference), target, align_by_headers)


def pair_on_target_grid(pair: VolumePair, reference: Volume, target: Volume,
                        align_by_headers: bool) -> tuple[np.ndarray, np.ndarray]:
  """`load_pair` of the volumes already read from `pair`'s files."""
  reference_voxels, reference_affine = reference.voxels, reference.affine
  same_grid = (reference_voxels.shape == target.voxels.shape
               and np.allclose(reference_affine, target.affine, atol=GRID_TOLERANCE_MM))
  if not same_grid and align_by_headers:
    reference_voxels, overlap = resample_onto(reference_voxels, reference_affine,
                                              target.voxels.shape, target.affine)
    if not overlap:
      raise DataError(f'{pair.reference} and {pair.target}: by their headers the two volumes do '
                      'not overlap; they are not one head in one scanner frame')
    reference_affine = target.affine
  reference_slices = axial_slices(reference_voxels, reference_affine, pair.reference)
  target_slices = axial_slices(target.voxels, target.affine, pair.target)
  if reference_slices.shape != target_slices.shape:
    raise DataError(f'{pair.reference} and {pair.target}: the reference and the target differ '
                    f'in shape ({reference_slices.shape} vs {target_slices.shape}); register them '
                    'to one grid first')
  return reference_slices, target_slices


def intensity_scale(volume: np.ndarray, percentile: float, path: Path) -> float:
  """The `percentile` of the non-zero voxels: what `robust_scale` divides by."""
  foreground = volume[volume > 0]
  scale = float(np.percentile(foreground, percentile)) if foreground.size else 0.0
  if scale <= 0:
    raise DataError(f'{path}: the volume is empty (no positive voxels)')
  return scale


def robust_scale(volume: np.ndarray, percentile: float, path: Path) -> np.ndarray:
  """Divides by the `percentile` of the non-zero voxels and clips to [0, 1]."""
  return np.clip(volume / intensity_scale(volume, percentile, path), 0, 1).astype(np.float32)


def prepare_pair(pair: VolumePair, image_size: int, percentile: float = 99.5,
                 align_by_headers: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """(reference, target) as (slices, image_size, image_size) float32 in [0, 1]."""
  reference, target = load_pair(pair, align_by_headers)
  return (transforms.fit_to_size(robust_scale(reference, percentile, pair.reference), image_size),
          transforms.fit_to_size(robust_scale(target, percentile, pair.target), image_size))


def cached_pair(pair: VolumePair, image_size: int, percentile: float, align_by_headers: bool,
                cache_dir: str | os.PathLike | None = None) -> np.ndarray:
  """`prepare_pair` as one read-only memory-mapped (2, slices, size, size) array (reference,
  target).

  Decoding a .nii.gz takes ~0.5 s; random slices of many subjects would decode volumes over and
  over. The decoded volumes are cached once as .npy, keyed by the files' paths, sizes and
  modification times and by the preprocessing, so a changed file is decoded again.
  """
  stats = [_file_identity(p) for p in (pair.reference, pair.target)]
  # Pairs that are not aligned keep the key of before alignment existed: BraTS caches stay valid.
  settings = [stats, image_size, percentile] + (['aligned'] if align_by_headers else [])
  key = hashlib.sha1(json.dumps(settings).encode()).hexdigest()[:16]
  path = Path(cache_dir or default_cache_dir()) / f'{_file_safe(pair.name)}-{key}.npy'
  if not path.exists():
    volumes = np.stack(prepare_pair(pair, image_size, percentile, align_by_headers))
    write_atomically(path, lambda tmp: np.save(tmp, volumes), overwrite=True)
  return np.load(path, mmap_mode='r')


def _file_identity(path: StoragePath) -> tuple[str, int, int]:
  """(path, size, modification time): what tells a file from its next version."""
  stat = path.stat()
  if is_url(path):
    return str(path), stat.length, stat.mtime
  return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def _file_safe(name: str) -> str:
  return re.sub(r'[^A-Za-z0-9._-]', '_', name)


def foreground_slices(target: np.ndarray, min_foreground: float, level: float = 0.05
                      ) -> list[int]:
  """Indices of slices where more than `min_foreground` of the pixels exceed `level`."""
  fraction = (target > level).mean(axis=(1, 2))
  return [int(i) for i in np.flatnonzero(fraction > min_foreground)]


def covered_slices(reference: np.ndarray, target: np.ndarray, min_foreground: float,
                   aligned: bool) -> list[int]:
  """The target's foreground slices, and of a reference aligned by the headers those where it
  shows anatomy too: a reference scanned over a shorter stretch (IXI has a 29-slice PD against
  its 112-slice T2) guides only where it reaches."""
  chosen = foreground_slices(target, min_foreground)
  if aligned:
    reached = set(foreground_slices(reference, min_foreground))
    chosen = [i for i in chosen if i in reached]
  return chosen


def split_subjects(names: list[str], test_fraction: float, seed: int,
                   split_file: str | os.PathLike | None = None) -> dict[str, list[str]]:
  """Subject-level train/test split of `names`, seeded. With `split_file`: read it if it exists
  (and check that its subjects are present), else write it, so the split never changes
  silently."""
  if split_file is not None and as_path(split_file).exists():
    try:
      split = json.loads(as_path(split_file).read_text())
      assigned = split['train'] + split['test']
    except (ValueError, KeyError, TypeError) as e:
      raise DataError(f'{split_file}: not a split file ({e})') from e
    missing = sorted(set(assigned) - set(names))
    if missing:
      raise DataError(f'{split_file}: lists subjects not found in the data: {missing[:5]}')
    return {'train': split['train'], 'test': split['test']}
  order = np.random.default_rng(seed).permutation(len(names))
  num_test = max(1, round(len(names) * test_fraction)) if len(names) > 1 else 0
  split = {'train': sorted(names[i] for i in order[num_test:]),
           'test': sorted(names[i] for i in order[:num_test])}
  if split_file is not None:
    write_atomically(split_file, lambda tmp: tmp.write_text(json.dumps(split, indent=1)))
  return split
