"""Whole scans in, reconstructed scans out: NIfTI T1/T2 pairs (undersampling simulated with a
seeded mask) and fastMRI k-space files (reconstructed from the measured lines).

Outputs are written atomically (complete or absent) and never replace an existing file unless
`overwrite`; the sampling mask used is saved beside the output as `<name>_mask.npy`.
"""

import dataclasses
from pathlib import Path

import h5py
import jax
import ml_collections
import nibabel as nib
import numpy as np

from fsmnet_jax import metrics
from fsmnet_jax.data import DataError, kspace, transforms, volumes
from fsmnet_jax.data.masks import sampling_mask
from fsmnet_jax.files import StoragePath, local_copy, refuse_existing, write_together
from fsmnet_jax.inference import Reconstructor, data_consistency

# fastMRI's (and the reference's) centre fractions for its accelerations.
CENTER_FRACTIONS = {4: 0.08, 8: 0.04}
NIFTI_SUFFIXES = ('.nii', '.nii.gz')
_data_consistency = jax.jit(data_consistency)


@dataclasses.dataclass
class Reconstruction:
  """A reconstructed volume (slices, H, W) and how it compares with its zero-filled input."""
  image: np.ndarray
  zero_filled: np.ndarray
  mask: np.ndarray
  # fastMRI-convention PSNR against the fully-sampled input, when there is one (simulation).
  psnr: dict[str, float] = dataclasses.field(default_factory=dict)


def mask_config(data: ml_collections.ConfigDict, acceleration: int | None
                ) -> ml_collections.ConfigDict:
  """`data`'s mask settings at `acceleration` (its own when None), with fastMRI's centre
  fraction for an acceleration other than the config's. DataError if none is defined."""
  config = ml_collections.ConfigDict(data.to_dict())
  if acceleration is None or acceleration == data.acceleration:
    return config
  if acceleration not in CENTER_FRACTIONS:
    known = sorted({*CENTER_FRACTIONS, data.acceleration})
    raise DataError(f'no sampling mask is defined for acceleration {acceleration}: use one of '
                    f'{", ".join(map(str, known))}, or a config with config.data.acceleration='
                    f'{acceleration} and its config.data.center_fraction')
  config.acceleration, config.center_fraction = acceleration, CENTER_FRACTIONS[acceleration]
  return config


def mask_path(out: StoragePath) -> StoragePath:
  """Where the mask of output `out` goes: recon.nii.gz -> recon_mask.npy."""
  name = out.name
  for suffix in (*NIFTI_SUFFIXES, '.h5'):
    if name.endswith(suffix):
      name = name[:-len(suffix)]
      break
  return out.with_name(f'{name}_mask.npy')


def check_same_grid(t1_path: StoragePath, t1: volumes.Volume, t2_path: StoragePath,
                    t2: volumes.Volume) -> None:
  """DataError unless T1 and T2 share one voxel grid (shape, orientation and affine)."""
  where = f'{t1_path} and {t2_path}'
  or_align = ' (or align it by the headers: --align-by-headers)'
  if t1.voxels.shape != t2.voxels.shape:
    raise DataError(f'{where}: T1 and T2 differ in size ({t1.voxels.shape} vs '
                    f'{t2.voxels.shape}); resample T1 onto the T2 grid first{or_align}')
  t1_axes, t2_axes = nib.aff2axcodes(t1.affine), nib.aff2axcodes(t2.affine)
  if t1_axes != t2_axes:
    raise DataError(f'{where}: T1 and T2 differ in orientation ({"".join(t1_axes)} vs '
                    f'{"".join(t2_axes)}); reorient T1 to match T2 first{or_align}')
  if not np.allclose(t1.affine, t2.affine, atol=volumes.GRID_TOLERANCE_MM):
    raise DataError(f'{where}: T1 and T2 differ in voxel-to-world affine (same size and '
                    f'orientation, other spacing or origin); register T1 to T2 first{or_align}')


def simulate(reconstructor: Reconstructor, t2: np.ndarray, t1: np.ndarray, mask: np.ndarray,
             with_data_consistency: bool) -> Reconstruction:
  """Undersamples fully-sampled T2 slices with `mask` and reconstructs them, T1-guided."""
  full_kspace = kspace.fft2c(t2)
  zero_filled = kspace.zero_filled(full_kspace, mask)
  image = reconstructor(zero_filled, t1)
  if with_data_consistency:
    image = np.asarray(_data_consistency(image, full_kspace * mask, mask))
  psnr = {name: float(metrics.volume_psnr(t2, x))
          for name, x in (('zero_filled', zero_filled), ('fsmnet', image))}
  return Reconstruction(image, zero_filled, mask, psnr)


def reconstruct_nifti(reconstructor: Reconstructor, data: ml_collections.ConfigDict,
                      t1_path: StoragePath, t2_path: StoragePath, out: StoragePath,
                      acceleration: int | None, seed: int, with_data_consistency: bool = False,
                      overwrite: bool = False, align_by_headers: bool = False
                      ) -> Reconstruction:
  """T1-guided reconstruction of `t2_path` undersampled at `acceleration`, written to `out`
  (NIfTI) on the T2 file's grid, with its affine and header. A T1 on another voxel grid is
  refused, or with `align_by_headers` resampled onto the T2 grid through the two affines (as
  IXI's T1 for training; T2 slices beyond the T1's reach get an empty reference)."""
  if not out.name.endswith(NIFTI_SUFFIXES):
    raise DataError(f'{out}: a NIfTI input gives a NIfTI output; name it .nii or .nii.gz')
  refuse_existing([out, mask_path(out)], overwrite)
  t1_file, t2_file = volumes.read_volume(t1_path), volumes.read_volume(t2_path)
  if not align_by_headers:
    check_same_grid(t1_path, t1_file, t2_path, t2_file)
  t1_raw, t2_raw = volumes.pair_on_target_grid(volumes.VolumePair(t2_path.name, t2_path, t1_path),
                                               t1_file, t2_file, align_by_headers)
  size, percentile = data.image_size, data.percentile
  scale = volumes.intensity_scale(t2_raw, percentile, t2_path)
  t1 = transforms.fit_to_size(volumes.robust_scale(t1_raw, percentile, t1_path), size)
  t2 = transforms.fit_to_size(np.clip(t2_raw / scale, 0, 1).astype(np.float32), size)
  mask = sampling_mask(mask_config(data, acceleration), (size, size), seed).astype(np.float32)
  result = simulate(reconstructor, t2, t1, mask, with_data_consistency)
  # Back to the file's grid and intensities; what lies outside the model's field is zero.
  volume = volumes.to_file_layout(transforms.fit_to_size(result.image, t2_raw.shape[1:]) * scale,
                                  t2_file.affine)
  header = t2_file.header.copy()
  header.set_data_dtype(np.float32)
  image = nib.Nifti1Image(volume.astype(np.float32), t2_file.affine, header)
  image.header.set_slope_inter(1.0, 0.0)
  write_together({out: lambda tmp: nib.save(image, str(tmp)),
                  mask_path(out): lambda tmp: np.save(tmp, mask)}, overwrite)
  return result


def _read_kspace(path: StoragePath) -> tuple[np.ndarray, np.ndarray | None]:
  """(slices, [coils,] rows, cols) complex k-space and the file's (cols,) `mask` if it has
  one."""
  try:
    with local_copy(path) as local, h5py.File(local, 'r') as f:
      for name in ('kspace', 'mask'):
        if name in f and not isinstance(f[name], h5py.Dataset):
          raise DataError(f'{path}: not a readable fastMRI h5 file with "kspace" ("{name}" is '
                          f'a {type(f[name]).__name__}, not a dataset)')
      values = f['kspace'][()]
      file_mask = f['mask'][()] if 'mask' in f else None
  except FileNotFoundError:
    raise DataError(f'{path}: no such file') from None
  except (OSError, KeyError) as e:
    raise DataError(f'{path}: not a readable fastMRI h5 file with "kspace" ({e})') from e
  if values.ndim not in (3, 4) or not np.iscomplexobj(values):
    raise DataError(f'{path}: "kspace" must be complex (slices, rows, cols) single-coil or '
                    f'(slices, coils, rows, cols) multi-coil data; got {values.dtype} '
                    f'{values.shape}')
  if not np.isfinite(values).all():
    raise DataError(f'{path}: "kspace" holds NaN/inf samples')
  if file_mask is not None and np.shape(file_mask) != (values.shape[-1],):
    raise DataError(f'{path}: "mask" has shape {np.shape(file_mask)}; expected one entry per '
                    f'k-space column ({values.shape[-1]})')
  return values, file_mask


def measured_mask(path: StoragePath, values: np.ndarray, file_mask: np.ndarray | None,
                  data: ml_collections.ConfigDict, acceleration: int | None, seed: int
                  ) -> tuple[np.ndarray, bool]:
  """The (rows, cols) mask of measured samples: the file's, else its non-zero columns; a
  fully-sampled file is undersampled with a seeded mask (needs `acceleration`). Also says
  whether the undersampling was simulated."""
  rows, cols = values.shape[-2:]
  if file_mask is not None:
    if not np.any(file_mask):
      raise DataError(f'{path}: its "mask" marks no k-space column as sampled')
    return np.broadcast_to(np.asarray(file_mask, np.float32), (rows, cols)).copy(), False
  measured = np.any(values != 0, axis=tuple(range(values.ndim - 1)))
  if not measured.any():
    raise DataError(f'{path}: "kspace" holds only zeros')
  if not measured.all():
    return np.broadcast_to(measured.astype(np.float32), (rows, cols)).copy(), False
  if acceleration is None:
    raise DataError(f'{path}: the k-space is fully sampled and has no "mask"; pass '
                    f'--acceleration to simulate undersampling')
  return sampling_mask(mask_config(data, acceleration), (rows, cols), seed).astype(np.float32), True


def reconstruct_kspace(reconstructor: Reconstructor, data: ml_collections.ConfigDict,
                       kspace_path: StoragePath, reference_path: StoragePath, out: StoragePath,
                       acceleration: int | None, seed: int, with_data_consistency: bool = False,
                       overwrite: bool = False) -> Reconstruction:
  """Reconstruction from a fastMRI-format k-space file, single- or multi-coil (the network sees
  the root-sum-of-squares of the coil images, and gives that image), guided by the
  fully-sampled reference contrast (`reference_path`, either format), written to `out`: `.h5`
  with a `reconstruction` dataset (fastMRI's convention) or NIfTI."""
  if not out.name.endswith((*NIFTI_SUFFIXES, '.h5')):
    raise DataError(f'{out}: name the output .h5 (fastMRI format), .nii or .nii.gz')
  refuse_existing([out, mask_path(out)], overwrite)
  values, file_mask = _read_kspace(kspace_path)
  coils = values.ndim == 4
  if coils and with_data_consistency:
    raise DataError(f'{kspace_path}: multi-coil k-space; data consistency would need the '
                    'coils\' sensitivities, which are not estimated: run without '
                    '--data-consistency')
  reference, _ = _read_kspace(reference_path)
  if values.shape[0] != reference.shape[0]:
    raise DataError(f'{kspace_path} and {reference_path}: {values.shape[0]} vs '
                    f'{reference.shape[0]} slices; give the reference scan of the same volume')
  size = data.image_size
  for path, volume in ((kspace_path, values), (reference_path, reference)):
    if min(volume.shape[-2:]) < size:
      raise DataError(f'{path}: k-space of {volume.shape[-2]}x{volume.shape[-1]} is smaller '
                      f'than the model\'s image size {size} (config.data.image_size)')
  mask, simulated = measured_mask(kspace_path, values, file_mask, data, acceleration, seed)
  measured = values * mask
  zero_filled = kspace.zero_filled(measured, size=size, coils=coils)
  image = reconstructor(zero_filled,
                        kspace.zero_filled(reference, size=size, coils=reference.ndim == 4))
  if with_data_consistency:
    image = _full_grid_consistency(image, measured, mask)
  psnr = {}
  if simulated:
    target = kspace.zero_filled(values, size=size, coils=coils)
    psnr = {name: float(metrics.volume_psnr(target, x))
            for name, x in (('zero_filled', zero_filled), ('fsmnet', image))}
  result = Reconstruction(image, zero_filled, mask, psnr)
  if out.name.endswith('.h5'):
    def write(tmp: Path) -> None:
      with h5py.File(tmp, 'w') as f:
        f.create_dataset('reconstruction', data=image.astype(np.float32))
        f.attrs.update({'source': str(kspace_path), 'reference': str(reference_path),
                        'acceleration': float(mask.size / mask.sum()),
                        'data_consistency': with_data_consistency})
  else:
    def write(tmp: Path) -> None:
      # (slices, rows, cols) -> (cols, rows, slices) voxels; the knee files carry no world
      # geometry we rely on, so the affine is the identity (1 mm voxels).
      nib.save(nib.Nifti1Image(image.transpose(2, 1, 0).astype(np.float32), np.eye(4)), str(tmp))
  write_together({out: write, mask_path(out): lambda tmp: np.save(tmp, mask)}, overwrite)
  return result


def _full_grid_consistency(image: np.ndarray, measured: np.ndarray, mask: np.ndarray
                           ) -> np.ndarray:
  """Data consistency on the measured (uncropped) k-space grid: the reconstruction's
  magnitude in the central crop, the zero-filled image outside it, both with the zero-filled
  image's phase (the network sees magnitudes only)."""
  zero_filled = kspace.ifft2c(measured)
  magnitude = np.abs(zero_filled).astype(np.float32)
  rows, cols = magnitude.shape[1:]
  top, left = (rows - image.shape[1]) // 2, (cols - image.shape[2]) // 2
  magnitude[:, top:top + image.shape[1], left:left + image.shape[2]] = image
  consistent = _data_consistency(magnitude, measured.astype(np.complex64), mask,
                                  np.angle(zero_filled).astype(np.float32))
  return transforms.fit_to_size(np.asarray(consistent), image.shape[1])
