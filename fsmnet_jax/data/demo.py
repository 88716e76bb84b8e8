"""A small synthetic multi-contrast data set in the real file formats.

Writes a BraTS-layout folder of NIfTI volumes (T1/T2, stored like BraTS: int16, LPS affine) and
fastMRI-format single-coil knee files (PD/PDFS k-space, `reconstruction_esc`, ISMRMRD header)
with a pairs CSV. Deterministic from the seed. The brain subjects are ellipsoid phantoms
(`phantoms`: fast, for the tests) or, with anatomy='brain', a real brain's anatomy
(`brain_template`: the ICBM152 template deformed per subject; needs nilearn).
"""

import csv
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

from fsmnet_jax.data import kspace
from fsmnet_jax.data import brain_template
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


def _write_nifti(volume_dhw: np.ndarray, path: Path) -> None:
  # NIfTI arrays are (x, y, z); in LPS x runs right->left and y anterior->posterior, so the
  # image (rows = anterior->posterior, cols = right->left) maps to x = col, y = row.
  data = np.round(volume_dhw.transpose(2, 1, 0) * INT16_SCALE).astype(np.int16)
  write_atomically(path, lambda tmp: nib.save(nib.Nifti1Image(data, BRATS_AFFINE), tmp))


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


def write_fastmri(root: Path, num_pairs: int, image_size: int, num_slices: int,
                  rng: np.random.Generator) -> Path:
  """Single-coil knee-format files (PD and PDFS of one anatomy per pair) and pairs.csv."""
  root.mkdir(parents=True, exist_ok=False)
  rows = []
  for i in range(num_pairs):
    volumes = head_phantom((num_slices, image_size, image_size), rng)
    names = (f'file_demo{2 * i:04d}', f'file_demo{2 * i + 1:04d}')
    for name, contrast, acquisition in zip(names, ('pd', 'pdfs'), ('CORPD_FBK', 'CORPDFS_FBK')):
      _write_knee_h5(root / f'{name}.h5', volumes[contrast], image_size, acquisition)
    rows.append((*names, f'{rng.uniform(0.2, 0.4):.6f}'))
  pairs = root / 'pairs.csv'
  with open(pairs, 'w', newline='') as f:
    csv.writer(f).writerows(rows)  # PD file, PDFS file, a score: the reference's CSV layout
  return pairs


def make_demo_data(out_dir: str | Path, seed: int = 0, num_subjects: int = 8,
                   num_knee_pairs: int = 4, image_size: int = 64, num_slices: int = 16,
                   anatomy: str = 'phantom') -> Path:
  """Writes out_dir/brats (`anatomy`: 'phantom' or 'brain') and out_dir/fastmri; refuses to
  touch an existing out_dir."""
  if anatomy not in ANATOMIES:
    raise ValueError(f'anatomy {anatomy!r}: use one of {", ".join(ANATOMIES)}')
  out_dir = Path(out_dir)
  if out_dir.exists() and any(out_dir.iterdir()):
    raise FileExistsError(f'{out_dir}: exists and is not empty; choose a new folder')
  rng = np.random.default_rng(seed)
  write_brats(out_dir / 'brats', num_subjects, image_size, num_slices, rng, anatomy)
  write_fastmri(out_dir / 'fastmri', num_knee_pairs, image_size, num_slices, rng)
  return out_dir
