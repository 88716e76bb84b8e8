"""BraTS loading: the demo generator's files, hand-made edge cases, bad input, the split."""

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from fsmnet_jax.data import DataError, brats, volumes
from fsmnet_jax.data.demo import make_demo_data


@pytest.fixture(scope='module')
def demo_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('demo')
  make_demo_data(root, seed=0, num_subjects=4, num_knee_pairs=1, image_size=48, num_slices=10)
  return root / 'brats'


def _save(path, data, affine=np.eye(4)):
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(data, affine), str(path))
  return path


def test_demo_subjects_load_with_tissue_contrast(demo_root):
  subjects = brats.find_subjects(demo_root)
  assert [s.name for s in subjects] == [f'DemoBraTS_{i:03d}' for i in range(4)]
  t1, t2 = volumes.prepare_pair(subjects[0], 48)
  assert t1.shape == t2.shape == (10, 48, 48) and t1.dtype == np.float32
  assert 0 <= t1.min() and t1.max() <= 1
  middle = len(t1) // 2
  csf = (t2[middle] > 0.9) & (t1[middle] < 0.3)  # CSF: bright in T2, dark in T1
  assert csf.sum() > 10
  kept = volumes.foreground_slices(t2, 0.1)
  assert set(range(2, 8)) <= set(kept)  # the head's middle; its cap may fall below 10%
  blank = t2.copy()
  blank[4] = 0
  assert volumes.foreground_slices(blank, 0.1) == [i for i in kept if i != 4]


def test_orientation_follows_the_affine(tmp_path):
  volume = np.random.default_rng(0).random((20, 24, 8)).astype(np.float32)  # x, y, z in RAS
  ras = volumes.load_axial_slices(_save(tmp_path / 'ras_t1.nii.gz', volume))
  # The same anatomy stored with flipped x and y axes (LPS), and with axes permuted (z, x, y).
  lps = volumes.load_axial_slices(_save(tmp_path / 'lps_t1.nii.gz', volume[::-1, ::-1],
                                      np.diag([-1.0, -1.0, 1.0, 1.0])))
  permuted_affine = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)
  permuted = volumes.load_axial_slices(_save(tmp_path / 'zxy_t1.nii.gz', volume.transpose(2, 0, 1),
                                           permuted_affine))
  assert ras.shape == (8, 24, 20)
  np.testing.assert_array_equal(lps, ras)
  np.testing.assert_array_equal(permuted, ras)


def test_int16_4d_and_odd_sizes(tmp_path):
  rng = np.random.default_rng(1)
  data = (rng.random((37, 251, 9, 1)) * 1000).astype(np.int16)
  folder = tmp_path / 'subj'
  _save(folder / 'subj_t1.nii', data)
  _save(folder / 'subj_t2.nii.gz', data[:, :, :, 0] // 2)
  subject = brats.find_subjects(tmp_path)[0]
  t1, t2 = volumes.prepare_pair(subject, 64)
  assert t1.shape == t2.shape == (9, 64, 64)
  assert np.all(t1[:, :, :13] == 0) and np.all(t1[:, :, -14:] == 0)  # 37 columns, zero-padded
  assert np.count_nonzero(t1[:, :, 13:50]) > 0.9 * 9 * 64 * 37
  np.testing.assert_allclose(np.percentile(t1[t1 > 0], 99), 1.0, atol=0.01)


def test_2023_naming(tmp_path):
  volume = np.ones((16, 16, 4), np.float32)
  _save(tmp_path / 'BraTS-GLI-00001-000' / 'BraTS-GLI-00001-000-t1n.nii.gz', volume)
  _save(tmp_path / 'BraTS-GLI-00001-000' / 'BraTS-GLI-00001-000-t1c.nii.gz', volume)
  _save(tmp_path / 'BraTS-GLI-00001-000' / 'BraTS-GLI-00001-000-t2w.nii.gz', volume)
  [subject] = brats.find_subjects(tmp_path)
  assert subject.reference.name.endswith('-t1n.nii.gz') and subject.target.name.endswith('-t2w.nii.gz')


def test_bad_input_names_the_file(tmp_path):
  with pytest.raises(DataError, match='no such data folder'):
    brats.find_subjects(tmp_path / 'absent')
  with pytest.raises(DataError, match='no subject folders'):
    brats.find_subjects(tmp_path)
  volume = np.random.default_rng(0).random((16, 16, 4)).astype(np.float32)
  _save(tmp_path / 'one' / 'one_t1.nii.gz', volume)
  with pytest.raises(DataError, match=r'one: expected one T2 volume .* found 0'):
    brats.find_subjects(tmp_path)

  bad = tmp_path / 'bad'
  nan_volume = volume.copy()
  nan_volume[3, 4, 1] = np.nan
  with pytest.raises(DataError, match=r'nan_t1.nii.gz: 1 NaN/inf voxels'):
    volumes.load_axial_slices(_save(bad / 'nan_t1.nii.gz', nan_volume))
  good = _save(bad / 'good_t1.nii.gz', volume)
  truncated = bad / 'trunc_t1.nii.gz'
  truncated.write_bytes(good.read_bytes()[:200])
  with pytest.raises(DataError, match='trunc_t1.nii.gz: not a readable NIfTI volume'):
    volumes.load_axial_slices(truncated)
  garbage = bad / 'garbage_t1.nii.gz'
  garbage.write_bytes(gzip.compress(b'not a nifti header at all' * 20))
  with pytest.raises(DataError, match='garbage_t1.nii.gz: not a readable NIfTI volume'):
    volumes.load_axial_slices(garbage)

  pair = tmp_path / 'pairs' / 'mismatch'
  _save(pair / 'mismatch_t1.nii.gz', volume)
  _save(pair / 'mismatch_t2.nii.gz', volume[:, :12])
  [subject] = brats.find_subjects(tmp_path / 'pairs')
  with pytest.raises(DataError, match=r'the reference and the target differ in shape'):
    volumes.prepare_pair(subject, 16)
  empty = _save(tmp_path / 'empty' / 'e_t1.nii.gz', np.zeros((8, 8, 2), np.float32))
  with pytest.raises(DataError, match='e_t1.nii.gz: the volume is empty'):
    volumes.robust_scale(volumes.load_axial_slices(empty), 99.5, empty)


def test_split_is_seeded_written_once_and_respected(demo_root, tmp_path):
  subjects = brats.find_subjects(demo_root)
  names = [s.name for s in subjects]
  split_file = tmp_path / 'split.json'
  split = volumes.split_subjects(names, 0.25, seed=0, split_file=split_file)
  assert len(split['test']) == 1 and len(split['train']) == 3
  assert sorted(split['train'] + split['test']) == names
  assert json.loads(split_file.read_text()) == split
  # A different seed does not silently change a split that has been written.
  assert volumes.split_subjects(names, 0.25, seed=5, split_file=split_file) == split
  assert volumes.split_subjects(names, 0.25, seed=0) == split
  split_file.write_text(json.dumps({'train': ['ghost'], 'test': []}))
  with pytest.raises(DataError, match="split.json: lists subjects not found.*ghost"):
    volumes.split_subjects(names, 0.25, seed=0, split_file=split_file)
