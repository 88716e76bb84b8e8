"""The demo data generator: real formats, deterministic, never overwrites."""

import csv

import h5py
import nibabel as nib
import numpy as np
import pytest

from fsmnet_jax.data import kspace
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
