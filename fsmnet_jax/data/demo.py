"""A small synthetic multi-contrast data set in the real file formats.

Writes, each in the layout its download unpacks to: BraTS (NIfTI T1/T2 per subject folder,
int16, LPS affine); IXI (T1, T2, PD in one folder per contrast; T2 and PD on one axial grid, T1
on a sagittal grid of other voxels); fastMRI single-coil knee (PD/PDFS k-space,
`reconstruction_esc`, ISMRMRD header) with a pairs CSV; fastMRI multi-coil knee (4 coils, the
readout oversampled 2x, `reconstruction_rss`) with its pairs CSV; M4Raw (multicoil_train and
multicoil_val, T1 and T2 three repetitions and FLAIR two, each with its own noise).
Deterministic from the seed. The BraTS subjects are ellipsoid phantoms (`phantoms`: fast, for
the tests) or, with anatomy='brain', a real brain's anatomy (`brain_template`: the ICBM152
template deformed per subject; needs nilearn); the other layouts hold phantoms, whose PD and
PD fat-suppressed contrasts the template lacks (M4Raw's FLAIR: the fat-suppressed PD phantom).
"""

import csv
from pathlib import Path
from typing import Any, Callable

import h5py
import nibabel as nib
import numpy as np

from fsmnet_jax.data import brain_template, kspace, transforms, volumes
from fsmnet_jax.data.phantoms import head_phantom
from fsmnet_jax.files import write_atomically

ANATOMIES = ('phantom', 'brain')
BRATS_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])  # BraTS volumes are stored in LPS orientation
INT16_SCALE = 3000  # demo intensities in [0, ~1] stored as int16 counts, like scanner data
ISMRMRD_HEADER = """<?xml version="1.0" encoding="utf-8"?>
<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">
  <encoding>
    <encodedSpace><matrixSize><x>{kx}</x><y>{ky}</y><z>1</z></matrixSize></encodedSpace>
    <reconSpace><matrixSize><x>{rx}</x><y>{ry}</y><z>1</z></matrixSize></reconSpace>
    <encodingLimits><kspace_encoding_step_1><minimum>0</minimum><maximum>{ky_max}</maximum>
      <center>{ky_center}</center></kspace_encoding_step_1></encodingLimits>
  </encoding>
</ismrmrdHeader>"""
IXI_SITES = ('Guys', 'HH', 'IOP')
IXI_FIELD_OF_VIEW_MM = 240
COILS = 4
KNEE_READOUT_OVERSAMPLING = 2  # fastMRI's knee k-space has twice the image's rows
# The config.data settings that read each layout make_demo_data writes (paths relative to its
# output folder; `layout_settings` makes them whole).
LAYOUT_SETTINGS = {
    'brats': {'dataset': 'brats', 'root': 'brats'},
    'ixi': {'dataset': 'ixi', 'root': 'ixi'},  # PD guides T2: one grid
    'ixi_t1': {'dataset': 'ixi', 'root': 'ixi', 'reference_contrast': 'T1'},  # through affines
    'nifti_pairs': {'dataset': 'nifti_pairs', 'root': 'brats', 'target_glob': '*_t2.nii.gz',
                    'reference_glob': '*_t1.nii.gz'},
    'fastmri': {'dataset': 'fastmri', 'root': 'fastmri', 'train_pairs': 'fastmri/pairs.csv',
                'test_pairs': 'fastmri/pairs.csv'},
    'fastmri_multicoil': {'dataset': 'fastmri_multicoil', 'root': 'fastmri_multicoil',
                          'train_pairs': 'fastmri_multicoil/pairs.csv',
                          'test_pairs': 'fastmri_multicoil/pairs.csv'},
    'm4raw': {'dataset': 'm4raw', 'root': 'm4raw', 'target_contrast': 'T2',
              'reference_contrast': 'T1'},
}
M4RAW_REPETITIONS = {'T1': 3, 'T2': 3, 'FLAIR': 2}
M4RAW_PHANTOM = {'T1': 't1', 'T2': 't2', 'FLAIR': 'pdfs'}  # FLAIR: CSF dark, as fat-suppressed PD
M4RAW_NOISE = 0.02  # per repetition, in k-space (and so in each coil image: orthonormal FFT)


def _write_nifti(volume_dhw: np.ndarray, path: Path) -> None:
  # NIfTI arrays are (x, y, z); in LPS x runs right->left and y anterior->posterior, so the
  # image (rows = anterior->posterior, cols = right->left) maps to x = col, y = row.
  _save_int16(volume_dhw.transpose(2, 1, 0), BRATS_AFFINE, path)


def _save_int16(data: np.ndarray, affine: np.ndarray, path: Path) -> None:
  counts = np.round(data * INT16_SCALE).astype(np.int16)
  write_atomically(path, lambda tmp: nib.save(nib.Nifti1Image(counts, affine), tmp))


def write_brats(root: Path, num_subjects: int, image_size: int, num_slices: int,
                rng: np.random.Generator, anatomy: str = 'phantom') -> list[Path]:
  """BraTS layout: root/<subject>/<subject>_t1.nii.gz and _t2.nii.gz."""
  make_volumes = brain_template.brain_volumes if anatomy == 'brain' else head_phantom
  subjects = []
  for i in range(num_subjects):
    name = f'DemoBraTS_{i:03d}'
    volumes = make_volumes((num_slices, image_size, image_size), rng)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=False)
    for contrast in ('t1', 't2'):
      _write_nifti(volumes[contrast], folder / f'{name}_{contrast}.nii.gz')
    subjects.append(folder)
  return subjects


def _write_knee_h5(path: Path, images: np.ndarray, crop: int, acquisition: str) -> None:
  _, height, width = images.shape
  rows = np.linspace(-1, 1, height)[:, None]
  phase = np.exp(1j * np.pi * 0.3 * (rows + 0.5 * np.linspace(-1, 1, width)[None]))
  volume_kspace = kspace.fft2c(images * phase).astype(np.complex64)
  reconstruction = kspace.zero_filled(volume_kspace, size=crop)

  def write(tmp: Path) -> None:
    with h5py.File(tmp, 'w') as f:
      f.create_dataset('kspace', data=volume_kspace)
      f.create_dataset('reconstruction_esc', data=reconstruction)
      f.create_dataset('ismrmrd_header', data=ISMRMRD_HEADER.format(
          kx=height, ky=width, rx=crop, ry=crop, ky_max=width - 1, ky_center=width // 2).encode())
      f.attrs['acquisition'] = acquisition
      f.attrs['max'] = float(reconstruction.max())
      f.attrs['norm'] = float(np.linalg.norm(reconstruction))
      f.attrs['patient_id'] = path.stem

  write_atomically(path, write)


def _knee_slab(num_slices: int, image_size: int, rng: np.random.Generator
               ) -> dict[str, np.ndarray]:
  """Phantom volumes with anatomy in every slice, as a knee scan's slab has: the phantom's first
  and last slices barely touch its head, and an empty, noiseless slice scores an infinite
  PSNR."""
  volumes = head_phantom((num_slices + 2, image_size, image_size), rng)
  return {contrast: volume[1:-1] for contrast, volume in volumes.items()}


def _write_knee_pairs(root: Path, num_pairs: int, image_size: int, num_slices: int,
                      rng: np.random.Generator, prefix: str,
                      write_file: Callable[[Path, np.ndarray, str], Any]) -> Path:
  """`num_pairs` PD/PDFS pairs (one anatomy each) written by `write_file(path, volume,
  acquisition)` as root/<prefix>NNNN.h5, and pairs.csv as the reference's: PD file, PDFS file,
  a score."""
  root.mkdir(parents=True, exist_ok=False)
  rows = []
  for i in range(num_pairs):
    volumes = _knee_slab(num_slices, image_size, rng)
    names = (f'{prefix}{2 * i:04d}', f'{prefix}{2 * i + 1:04d}')
    for name, contrast, acquisition in zip(names, ('pd', 'pdfs'), ('CORPD_FBK', 'CORPDFS_FBK')):
      write_file(root / f'{name}.h5', volumes[contrast], acquisition)
    rows.append((*names, f'{rng.uniform(0.2, 0.4):.6f}'))
  pairs = root / 'pairs.csv'
  with open(pairs, 'w', newline='') as f:
    csv.writer(f).writerows(rows)
  return pairs


def write_fastmri(root: Path, num_pairs: int, image_size: int, num_slices: int,
                  rng: np.random.Generator) -> Path:
  """Single-coil knee-format files (PD and PDFS of one anatomy per pair) and pairs.csv."""
  return _write_knee_pairs(
      root, num_pairs, image_size, num_slices, rng, 'file_demo',
      lambda path, volume, acquisition: _write_knee_h5(path, volume, image_size, acquisition))


def _grid_affine(axes_mm: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """The affine whose voxel axes step by the columns of `axes_mm` (3x3), centred on the origin
  of scanner coordinates."""
  affine = np.eye(4)
  affine[:3, :3] = axes_mm
  affine[:3, 3] = -axes_mm @ ((np.array(shape) - 1) / 2)
  return affine


def ixi_grids(image_size: int, num_slices: int) -> dict[str, tuple[np.ndarray, tuple]]:
  """(affine, shape) of the demo's IXI scans: 'axial' (T2 and PD, x and y flipped as IXI's
  files) and 'sagittal' (T1: finer voxels, its axes running posterior, inferior and right as
  IXI's T1, covering the axial scan's field of view)."""
  pixel = IXI_FIELD_OF_VIEW_MM / image_size
  axial_shape = (image_size, image_size, num_slices)
  axial = _grid_affine(np.diag([-pixel, -pixel, 2 * pixel]), axial_shape)
  voxel = 0.8 * pixel
  extent = np.array(axial_shape) * np.abs(np.diag(axial)[:3])  # x, y, z in mm
  sagittal_shape = tuple(int(np.ceil(extent[axis] / voxel)) + 1 for axis in (1, 2, 0))
  sagittal_axes = np.array([[0, 0, voxel], [-voxel, 0, 0], [0, -voxel, 0]])
  return {'axial': (axial, axial_shape),
          'sagittal': (_grid_affine(sagittal_axes, sagittal_shape), sagittal_shape)}


def write_ixi(root: Path, num_subjects: int, image_size: int, num_slices: int,
              rng: np.random.Generator) -> list[str]:
  """IXI as its tarballs unpack into one folder per contrast:
  root/IXI-<contrast>/IXI<nnn>-<site>-<id>-<contrast>.nii.gz. Returns the subjects' names."""
  grids = ixi_grids(image_size, num_slices)
  axial, axial_shape = grids['axial']
  sagittal, sagittal_shape = grids['sagittal']
  names = []
  for i in range(num_subjects):
    name = f'IXI{i + 2:03d}-{IXI_SITES[i % len(IXI_SITES)]}-{828 + 17 * i:04d}'
    anatomy = {contrast: volumes.to_file_layout(slices, axial) for contrast, slices in
               head_phantom((num_slices, image_size, image_size), rng).items()}
    scans = {'T2': (anatomy['t2'], axial), 'PD': (anatomy['pd'], axial),
             'T1': (volumes.resample_onto(anatomy['t1'], axial, sagittal_shape, sagittal)[0],
                    sagittal)}
    for contrast, (data, affine) in scans.items():
      folder = root / f'IXI-{contrast}'
      folder.mkdir(parents=True, exist_ok=True)
      _save_int16(data, affine, folder / f'{name}-{contrast}.nii.gz')
    names.append(name)
  return names


def coil_sensitivities(shape: tuple[int, int], coils: int = COILS) -> np.ndarray:
  """(coils, H, W) smooth complex receive sensitivities around the field of view, normalised
  to unit root-sum-of-squares (so the coils' RSS image is the image)."""
  rows, cols = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing='ij')
  maps = []
  for c in range(coils):
    angle = 2 * np.pi * c / coils
    center = 0.8 * np.array([np.cos(angle), np.sin(angle)])
    magnitude = np.exp(-((rows - center[0]) ** 2 + (cols - center[1]) ** 2))
    maps.append(magnitude * np.exp(1j * (angle + 0.5 * rows)))
  maps = np.array(maps)
  return maps / np.sqrt(np.sum(np.abs(maps) ** 2, axis=0))


def write_multicoil_h5(path: Path, images: np.ndarray, acquisition: str = 'AXT2',
                       noise: float = 0.0, rng: np.random.Generator | None = None,
                       readout_oversampling: int = 1, coils: int = COILS) -> np.ndarray:
  """A fastMRI-format multi-coil file of `images` (slices, H, W) seen by `coils` coils: `kspace`
  (slices, coils, rows, cols) complex64 with complex Gaussian `noise`, the readout (rows)
  oversampled `readout_oversampling` times, and `reconstruction_rss` (the RSS of the coils
  cropped to H x W, as fastMRI's). Returns the k-space."""
  slices, height, width = images.shape
  padded = transforms.fit_to_size(images, (height * readout_oversampling, width))
  coil_images = padded[:, None] * coil_sensitivities(padded.shape[1:], coils)
  volume_kspace = kspace.fft2c(coil_images)
  if noise:
    volume_kspace = volume_kspace + noise * (rng.normal(size=volume_kspace.shape)
                                             + 1j * rng.normal(size=volume_kspace.shape))
  volume_kspace = volume_kspace.astype(np.complex64)
  reconstruction = kspace.zero_filled(volume_kspace, size=(height, width), coils=True)

  def write(tmp: Path) -> None:
    with h5py.File(tmp, 'w') as f:
      f.create_dataset('kspace', data=volume_kspace)
      f.create_dataset('reconstruction_rss', data=reconstruction)
      f.create_dataset('ismrmrd_header', data=ISMRMRD_HEADER.format(
          kx=padded.shape[1], ky=width, rx=height, ry=width, ky_max=width - 1,
          ky_center=width // 2).encode())
      f.attrs['acquisition'] = acquisition
      f.attrs['max'] = float(reconstruction.max())
      f.attrs['patient_id'] = path.stem

  write_atomically(path, write)
  return volume_kspace


def write_fastmri_multicoil(root: Path, num_pairs: int, image_size: int, num_slices: int,
                            rng: np.random.Generator, coils: int = COILS) -> Path:
  """Multi-coil knee-format files (PD and PDFS of one anatomy per pair) and pairs.csv."""
  return _write_knee_pairs(
      root, num_pairs, image_size, num_slices, rng, 'file_demo_mc',
      lambda path, volume, acquisition: write_multicoil_h5(
          path, volume, acquisition, readout_oversampling=KNEE_READOUT_OVERSAMPLING,
          coils=coils))


def write_m4raw(root: Path, num_subjects: int, image_size: int, num_slices: int,
                rng: np.random.Generator) -> dict[str, list[str]]:
  """M4Raw as unzipped: root/multicoil_train and root/multicoil_val (a quarter of the subjects,
  at least one) of <study>_<contrast><repetition>.h5; each repetition a new noisy scan of one
  anatomy. Returns the studies of each folder."""
  num_val = max(1, num_subjects // 4) if num_subjects else 0
  studies = {'multicoil_train': [f'20220610{i + 1:02d}' for i in range(num_subjects - num_val)],
             'multicoil_val': [f'20221011{i + 1:02d}' for i in range(num_val)]}
  for folder, names in studies.items():
    (root / folder).mkdir(parents=True, exist_ok=False)
    for study in names:
      anatomy = head_phantom((num_slices, image_size, image_size), rng)
      for contrast, repetitions in M4RAW_REPETITIONS.items():
        for k in range(1, repetitions + 1):
          write_multicoil_h5(root / folder / f'{study}_{contrast}{k:02d}.h5',
                             anatomy[M4RAW_PHANTOM[contrast]], f'AX{contrast}',
                             M4RAW_NOISE, rng)
  return studies


def layout_settings(out_dir: str | Path, layout: str) -> dict[str, str]:
  """config.data settings that read `layout` (a LAYOUT_SETTINGS key) of make_demo_data's
  output folder `out_dir`."""
  return {key: str(Path(out_dir) / value) if key.endswith(('root', 'pairs')) else value
          for key, value in LAYOUT_SETTINGS[layout].items()}


def make_demo_data(out_dir: str | Path, seed: int = 0, num_subjects: int = 8,
                   num_knee_pairs: int = 4, image_size: int = 64, num_slices: int = 16,
                   anatomy: str = 'phantom', num_ixi_subjects: int = 4,
                   num_multicoil_pairs: int = 2, num_m4raw_subjects: int = 2) -> Path:
  """Writes out_dir/brats (`anatomy`: 'phantom' or 'brain'), out_dir/fastmri, out_dir/ixi,
  out_dir/fastmri_multicoil and out_dir/m4raw; refuses to touch an existing out_dir."""
  if anatomy not in ANATOMIES:
    raise ValueError(f'anatomy {anatomy!r}: use one of {", ".join(ANATOMIES)}')
  out_dir = Path(out_dir)
  if out_dir.exists() and any(out_dir.iterdir()):
    raise FileExistsError(f'{out_dir}: exists and is not empty; choose a new folder')
  rng = np.random.default_rng(seed)
  write_brats(out_dir / 'brats', num_subjects, image_size, num_slices, rng, anatomy)
  write_fastmri(out_dir / 'fastmri', num_knee_pairs, image_size, num_slices, rng)
  # Each further layout from its own generator: adding one leaves the others' files as they were.
  ixi_rng, multicoil_rng, m4raw_rng = (np.random.default_rng((seed, i)) for i in range(1, 4))
  write_ixi(out_dir / 'ixi', num_ixi_subjects, image_size, num_slices, ixi_rng)
  write_fastmri_multicoil(out_dir / 'fastmri_multicoil', num_multicoil_pairs, image_size,
                          num_slices, multicoil_rng)
  write_m4raw(out_dir / 'm4raw', num_m4raw_subjects, image_size, num_slices, m4raw_rng)
  return out_dir
