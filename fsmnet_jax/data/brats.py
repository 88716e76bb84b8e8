"""BraTS: subject discovery, NIfTI loading in a fixed orientation, slicing, and the split.

Layout: one folder per subject holding `*_t1.nii[.gz]` and `*_t2.nii[.gz]` (2018-2021 naming)
or `*-t1n.nii.gz` and `*-t2w.nii.gz` (2023). Volumes are reoriented to RAS from their affine, so
axial slices are taken along the superior axis whatever the storage order.
"""

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np

from fsmnet_jax.data import DataError, transforms
from fsmnet_jax.files import default_cache_dir, write_atomically

# Smaller slices are no MR image (clinical matrices start at 64): a wrong axis order, a mask.
MIN_SLICE_SIZE = 8
CONTRAST_PATTERNS = {
    't1': re.compile(r'[_-](t1|t1n)\.nii(\.gz)?$', re.IGNORECASE),
    't2': re.compile(r'[_-](t2|t2w)\.nii(\.gz)?$', re.IGNORECASE),
}


@dataclasses.dataclass(frozen=True)
class Subject:
  name: str
  t1: Path
  t2: Path


def find_subjects(root: str | os.PathLike) -> list[Subject]:
  """Every subject folder under `root`, sorted by name. Folders with neither contrast are
  ignored; a folder with only one, or with two candidates for one, is an error."""
  root = Path(root)
  if not root.is_dir():
    raise DataError(f'{root}: no such data folder')
  subjects = []
  for folder in sorted(p for p in root.iterdir() if p.is_dir()):
    found = {c: sorted(f for f in folder.iterdir() if pattern.search(f.name))
             for c, pattern in CONTRAST_PATTERNS.items()}
    if not any(found.values()):
      continue
    for contrast, files in found.items():
      if len(files) != 1:
        raise DataError(f'{folder}: expected one {contrast.upper()} volume '
                        f'(*_{contrast}.nii.gz), found {len(files)}: {[f.name for f in files]}')
    subjects.append(Subject(folder.name, found['t1'][0], found['t2'][0]))
  if not subjects:
    raise DataError(f'{root}: no subject folders with *_t1.nii[.gz] and *_t2.nii[.gz] files')
  return subjects


def load_axial_slices(path: Path) -> np.ndarray:
  """(slices, rows, cols) float32: axial slices, rows anterior->posterior, cols right->left
  (radiological view), whatever the file's axis order and dtype."""
  try:
    image = nib.load(str(path))
    shape, dtype = image.shape, image.get_data_dtype()
    if 0 not in shape and dtype.kind in 'biuf':
      data = np.asarray(nib.as_closest_canonical(image).dataobj, dtype=np.float32)
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
  if min(data.shape[:2]) < MIN_SLICE_SIZE:
    raise DataError(f'{path}: slices of {data.shape[0]}x{data.shape[1]} voxels; the model needs '
                    f'at least {MIN_SLICE_SIZE}x{MIN_SLICE_SIZE}')
  if not np.isfinite(data).all():
    raise DataError(f'{path}: {int((~np.isfinite(data)).sum())} NaN/inf voxels')
  # RAS (x right, y anterior, z superior) -> (z, y reversed, x reversed).
  return np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])


def to_file_layout(slices: np.ndarray, affine: np.ndarray) -> np.ndarray:
  """Inverse of `load_axial_slices`: (slices, rows, cols) back to the axis order and directions
  of a file with this `affine`."""
  ras = slices[:, ::-1, ::-1].transpose(2, 1, 0)
  orientation = nib.orientations
  to_file = orientation.ornt_transform(orientation.axcodes2ornt('RAS'),
                                       orientation.io_orientation(affine))
  return orientation.apply_orientation(ras, to_file)


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


def load_subject(subject: Subject, image_size: int, percentile: float = 99.5
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(t1, t2) as (slices, image_size, image_size) float32 in [0, 1]."""
  t1, t2 = load_axial_slices(subject.t1), load_axial_slices(subject.t2)
  if t1.shape != t2.shape:
    raise DataError(f'{subject.t1} and {subject.t2}: T1 and T2 differ in shape '
                    f'({t1.shape} vs {t2.shape}); register them to one grid first')
  return (transforms.fit_to_size(robust_scale(t1, percentile, subject.t1), image_size),
          transforms.fit_to_size(robust_scale(t2, percentile, subject.t2), image_size))


def cached_subject(subject: Subject, image_size: int, percentile: float,
                   cache_dir: str | os.PathLike | None = None) -> np.ndarray:
  """`load_subject` as one read-only memory-mapped (2, slices, size, size) array (T1, T2).

  Decoding a .nii.gz takes ~0.5 s; random slices of many subjects would decode volumes over and
  over. The decoded volumes are cached once as .npy, keyed by the files' paths, sizes and
  modification times and by the preprocessing, so a changed file is decoded again.
  """
  stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns)
           for p in (subject.t1, subject.t2)]
  key = hashlib.sha1(json.dumps([stats, image_size, percentile]).encode()).hexdigest()[:16]
  path = Path(cache_dir or default_cache_dir()) / f'{subject.name}-{key}.npy'
  if not path.exists():
    volumes = np.stack(load_subject(subject, image_size, percentile))
    write_atomically(path, lambda tmp: np.save(tmp, volumes), overwrite=True)
  return np.load(path, mmap_mode='r')


def foreground_slices(t2: np.ndarray, min_foreground: float, level: float = 0.05) -> list[int]:
  """Indices of slices where more than `min_foreground` of the pixels exceed `level`."""
  fraction = (t2 > level).mean(axis=(1, 2))
  return [int(i) for i in np.flatnonzero(fraction > min_foreground)]


def split_subjects(subjects: list[Subject], test_fraction: float, seed: int,
                   split_file: str | os.PathLike | None = None) -> dict[str, list[str]]:
  """Subject-level train/test split, seeded. With `split_file`: read it if it exists (and check
  that its subjects are present), else write it, so the split never changes silently."""
  names = [s.name for s in subjects]
  if split_file is not None and Path(split_file).exists():
    try:
      split = json.loads(Path(split_file).read_text())
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
