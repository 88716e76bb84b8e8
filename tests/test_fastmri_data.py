"""fastMRI loading from the demo generator's files and hand-made bad files."""

import h5py
import numpy as np
import pytest

from fsmnet_jax.data import DataError, fastmri, kspace, masks, transforms
from fsmnet_jax.data.demo import make_demo_data


@pytest.fixture(scope='module')
def knee_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('demo')
  make_demo_data(root, seed=1, num_subjects=1, num_knee_pairs=2, image_size=40, num_slices=5)
  return root / 'fastmri'


def test_pairs_header_and_images(knee_root):
  pairs = fastmri.read_pairs(knee_root / 'pairs.csv', knee_root)
  assert [(p.reference[0].name, p.target[0].name, p.num_slices) for p in pairs] == [
      ('file_demo0000.h5', 'file_demo0001.h5', 5), ('file_demo0002.h5', 'file_demo0003.h5', 5)]
  pdfs = pairs[0].target[0]
  assert fastmri.read_header(pdfs) == {'encoding_size': (40, 40), 'recon_size': (40, 40)}
  slice_kspace = fastmri.read_kspace_slice(pdfs, 2)
  full = kspace.zero_filled(slice_kspace, size=32)
  with h5py.File(pdfs) as f:
    reference = f['reconstruction_esc'][2]
  np.testing.assert_allclose(full, transforms.fit_to_size(reference, 32), atol=1e-5)
  mask, _ = masks.RandomMaskFunc([0.08], [4])((1, 40, 1), seed=0)
  under = kspace.zero_filled(slice_kspace, mask.reshape(1, 40), 32)
  assert under.shape == (32, 32) and 0 < np.abs(under - full).mean() < full.mean()


def test_bad_files(knee_root, tmp_path):
  with pytest.raises(DataError, match='no such pairs file'):
    fastmri.read_pairs(tmp_path / 'none.csv', knee_root)
  listing = tmp_path / 'pairs.csv'
  listing.write_text('file_demo0000,file_missing,0.3\n')
  with pytest.raises(DataError, match=r'pairs.csv:1: .*file_missing.h5 does not exist'):
    fastmri.read_pairs(listing, knee_root)
  broken = tmp_path / 'broken.h5'
  broken.write_bytes((knee_root / 'file_demo0000.h5').read_bytes()[:1000])
  (tmp_path / 'ok.h5').write_bytes((knee_root / 'file_demo0001.h5').read_bytes())
  listing.write_text('broken,ok\n')
  with pytest.raises(DataError, match='broken.h5: not a readable fastMRI h5 file'):
    fastmri.read_pairs(listing, tmp_path)
  real = tmp_path / 'real.h5'
  with h5py.File(real, 'w') as f:
    f.create_dataset('kspace', data=np.zeros((2, 8, 8), np.float32))
  with pytest.raises(DataError, match=r'real.h5: "kspace" must be complex'):
    fastmri.kspace_shape(real)
  with pytest.raises(DataError, match='real.h5: no readable ISMRMRD header'):
    fastmri.read_header(real)
  nan = tmp_path / 'nan.h5'
  values = np.ones((2, 8, 8), np.complex64)
  values[1, 3, 3] = np.nan
  with h5py.File(nan, 'w') as f:
    f.create_dataset('kspace', data=values)
  with pytest.raises(DataError, match='nan.h5: slice 1 holds NaN/inf'):
    fastmri.read_kspace_slice(nan, 1)
  fastmri.read_kspace_slice(nan, 0)


def test_an_h5_file_in_a_bucket_is_not_closed_while_a_thread_reads_it(tmp_path, monkeypatch):
  """The open files of a bucket: beyond the limit the least recently opened idle ones close,
  never one a reader holds (M4Raw from a bucket, six files an example, failed with h5py's
  'invalid identifier' when one was)."""
  paths = []
  for i in range(3):
    paths.append(tmp_path / f'{i}.h5')
    with h5py.File(paths[-1], 'w') as f:
      f['kspace'] = np.full((2, 4, 4), i, np.complex64)

  def open_local(url):
    raw = open(url, 'rb')  # pylint: disable=consider-using-with  # closed with the h5 file
    return fastmri._OpenFile(raw, h5py.File(raw, 'r'))  # pylint: disable=protected-access

  monkeypatch.setattr(fastmri, '_open_in_bucket', open_local)
  files = fastmri._BucketFiles(most=1)  # pylint: disable=protected-access
  with files.open(paths[0]) as first:
    with files.open(paths[1]) as second:  # one beyond the limit: the first is held
      assert first.id.valid
    with files.open(paths[2]) as third:  # the second is idle: closed
      assert not second.id.valid and third['kspace'][0, 0, 0] == 2
    assert first['kspace'][1, 0, 0] == 0
  with files.open(paths[1]) as again:  # reopened; the first and third, idle, closed
    assert again['kspace'][0, 0, 0] == 1 and not first.id.valid and not third.id.valid
