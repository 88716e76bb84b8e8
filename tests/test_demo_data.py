"""The demo data generator: real formats, a real brain's anatomy, deterministic, never
overwrites."""

import csv
import sys

import h5py
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from fsmnet_jax.data import brain_template, brats, kspace, volumes
from fsmnet_jax.cli.make_demo_data import main
from fsmnet_jax.data.demo import make_demo_data


def test_formats_and_determinism(tmp_path):
  for name in ('a', 'b'):
    make_demo_data(tmp_path / name, seed=3, num_subjects=2, num_knee_pairs=2, image_size=32,
                   num_slices=4)
  t1 = nib.load(str(tmp_path / 'a/brats/DemoBraTS_001/DemoBraTS_001_t1.nii.gz'))
  assert t1.shape == (32, 32, 4) and t1.get_data_dtype() == np.int16
  assert nib.aff2axcodes(t1.affine) == ('L', 'P', 'S')
  again = nib.load(str(tmp_path / 'b/brats/DemoBraTS_001/DemoBraTS_001_t1.nii.gz'))
  np.testing.assert_array_equal(np.asarray(t1.dataobj), np.asarray(again.dataobj))

  with open(tmp_path / 'a/fastmri/pairs.csv') as f:
    pairs = list(csv.reader(f))
  assert [row[:2] for row in pairs] == [['file_demo0000', 'file_demo0001'],
                                        ['file_demo0002', 'file_demo0003']]
  with h5py.File(tmp_path / 'a/fastmri/file_demo0001.h5') as f:
    assert f.attrs['acquisition'] == 'CORPDFS_FBK'
    volume_kspace, reconstruction = f['kspace'][()], f['reconstruction_esc'][()]
    assert volume_kspace.dtype == np.complex64 and volume_kspace.shape == (4, 32, 32)
    assert b'<reconSpace><matrixSize><x>32</x>' in f['ismrmrd_header'][()]
  np.testing.assert_allclose(reconstruction, np.abs(kspace.ifft2c(volume_kspace)), atol=1e-5)


def test_refuses_a_non_empty_folder(tmp_path, capsys):
  (tmp_path / 'keep.txt').write_text('mine')
  assert main([str(tmp_path)]) == 2
  assert 'exists and is not empty' in capsys.readouterr().err
  assert (tmp_path / 'keep.txt').read_text() == 'mine'
  with pytest.raises(FileExistsError):
    make_demo_data(tmp_path)


def _correlation_in_brain(a, b):
  inside = (a > 0.1) & (b > 0.1)
  return float(np.corrcoef(a[inside], b[inside])[0, 1])


def _template_on_demo_grid(shape):
  """The template's T1 sampled on the demo's grid without any deformation."""
  template = brain_template.template()
  grid = brain_template._world_grid(shape).reshape(3, -1)  # pylint: disable=protected-access
  to_voxels = np.linalg.inv(template['affine'])
  return ndimage.map_coordinates(template['t1'], to_voxels[:3, :3] @ grid + to_voxels[:3, 3:],
                                 order=1).reshape(shape)


def test_brain_anatomy_is_the_template_in_place(monkeypatch):
  for setting in ('MAX_ROTATION_DEG', 'MAX_SCALING', 'MAX_SHIFT_MM', 'WARP_MM'):
    monkeypatch.setattr(brain_template, setting, 0)
  t1 = brain_template.brain_volumes((12, 64, 64), np.random.default_rng(0))['t1']
  template = _template_on_demo_grid(t1.shape)
  # Measured over seeds 0-2: 0.95-0.96 (noise, bias, lesions); the template one pixel to the
  # side 0.63-0.66, upside down (rows) 0.23-0.28.
  assert _correlation_in_brain(t1, template) > 0.9


def test_brain_anatomy_subjects_differ_as_patients_do(tmp_path, capsys):
  assert main([str(tmp_path / 'demo'), '--anatomy', 'brain', '--subjects', '2',
               '--knee-pairs', '0', '--image-size', '64', '--slices', '12']) == 0
  assert '(brain)' in capsys.readouterr().out
  pairs = brats.find_subjects(tmp_path / 'demo' / 'brats')
  (t1_a, t2_a), (t1_b, _) = (volumes.prepare_pair(pair, 64) for pair in pairs)
  template = _template_on_demo_grid(t1_a.shape)
  # Measured: correlations 0.91 and 0.93 with the template (whole volumes), the subjects 0.08
  # apart on average (of 1).
  for t1 in (t1_a, t1_b):
    assert np.corrcoef(t1.ravel(), template.ravel())[0, 1] > 0.85
  assert np.abs(t1_a - t1_b).mean() > 0.03
  # T2 contrast: CSF (dark in T1) is bright in T2, white matter (bright in T1) dark: 2.2x.
  csf, white_matter = (t1_a > 0.1) & (t1_a < 0.45), t1_a > 0.8
  assert t2_a[csf].mean() > 1.5 * t2_a[white_matter].mean()
  again = brain_template.brain_volumes((12, 64, 64), np.random.default_rng(5))
  np.testing.assert_array_equal(
      again['t2'], brain_template.brain_volumes((12, 64, 64), np.random.default_rng(5))['t2'])


def test_brain_anatomy_without_nilearn_is_one_line(tmp_path, capsys, monkeypatch):
  monkeypatch.setitem(sys.modules, 'nilearn', None)  # as if not installed
  brain_template.template.cache_clear()
  try:
    assert main([str(tmp_path / 'demo'), '--anatomy', 'brain']) == 2
  finally:
    brain_template.template.cache_clear()
  assert 'the brain demo needs nilearn: pip install "fsmnet-jax[brain]"' in capsys.readouterr().err
  assert not (tmp_path / 'demo').exists()
