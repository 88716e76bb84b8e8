"""IXI and your own NIfTI pairs: finding the files as downloaded, a reference on another voxel
grid aligned through the headers, and the refusals. The volumes are made here from one smooth
'head' in scanner coordinates, sampled on each file's own grid, as a scanner would."""

import json

import nibabel as nib
import numpy as np
import pytest

from fsmnet_jax.configs import default
from fsmnet_jax.data import DataError, ixi, pipeline, volumes


def head(world: np.ndarray, contrast: str) -> np.ndarray:
  """A smooth head at scanner coordinates `world` (3, N) mm: an ellipsoid with two blobs whose
  brightness depends on the contrast."""
  x, y, z = world
  body = np.exp(-((x / 40) ** 2 + (y / 50) ** 2 + (z / 35) ** 2) ** 2)
  left = np.exp(-((x + 15) ** 2 + (y - 10) ** 2 + z ** 2) / 200)
  right = np.exp(-((x - 15) ** 2 + (y + 10) ** 2 + (z - 8) ** 2) / 200)
  weights = {'T1': (1.0, 0.8, -0.5), 'T2': (0.6, -0.4, 0.9), 'PD': (0.9, 0.3, 0.3)}[contrast]
  return 1000 * np.clip(weights[0] * body + weights[1] * left + weights[2] * right, 0, None)


def scan(shape: tuple[int, int, int], affine: np.ndarray, contrast: str) -> np.ndarray:
  """The head sampled at the voxel centres of a grid, as int16 like IXI's files."""
  voxels = np.indices(shape).reshape(3, -1).astype(np.float64)
  world = affine[:3, :3] @ voxels + affine[:3, 3:]
  return head(world, contrast).reshape(shape).astype(np.int16)


# T2 and PD: one axial grid, 2 x 2 x 3 mm, stored with x and y flipped (LPS-like, as IXI's).
AXIAL = (np.array([[-2.0, 0, 0, 63], [0, -2.0, 0, 79], [0, 0, 3.0, -45], [0, 0, 0, 1]]),
         (64, 80, 30))
# T1: sagittal, 1.6 mm, its voxel axes running posterior, inferior and right (a sagittal storage
# order as IXI's T1), another field of view and origin.
SAGITTAL = (np.array([[0, 0, 1.6, -70], [-1.6, 0, 0, 90], [0, -1.6, 0, 62], [0, 0, 0, 1]]),
            (112, 76, 88))


def write(path, contrast, grid=AXIAL):
  affine, shape = grid
  path.parent.mkdir(parents=True, exist_ok=True)
  nib.save(nib.Nifti1Image(scan(shape, affine, contrast), affine), str(path))
  return path


@pytest.fixture(scope='module')
def ixi_root(tmp_path_factory):
  """IXI as its tarballs unpack: one folder per contrast, one file per subject and contrast."""
  root = tmp_path_factory.mktemp('IXI')
  for subject in ('IXI002-Guys-0828', 'IXI012-HH-1211', 'IXI017-Guys-0698', 'IXI035-IOP-0873'):
    for contrast in ('T2', 'PD'):
      write(root / f'IXI-{contrast}' / f'{subject}-{contrast}.nii.gz', contrast)
    write(root / 'IXI-T1' / f'{subject}-T1.nii.gz', 'T1', SAGITTAL)
  write(root / 'IXI-T2' / 'IXI013-HH-1212-T2.nii.gz', 'T2')  # no PD, no T1: left out
  (root / 'IXI.xls').write_bytes(b'demographics, not read')
  return root


def test_subjects_are_paired_across_the_contrast_folders(ixi_root):
  pairs = ixi.find_subjects(ixi_root)
  assert [p.name for p in pairs] == ['IXI002-Guys-0828', 'IXI012-HH-1211', 'IXI017-Guys-0698',
                                     'IXI035-IOP-0873']
  assert pairs[1].target == ixi_root / 'IXI-T2' / 'IXI012-HH-1211-T2.nii.gz'
  assert pairs[1].reference == ixi_root / 'IXI-PD' / 'IXI012-HH-1211-PD.nii.gz'
  assert [p.name for p in ixi.find_subjects(ixi_root, sites='Guys, IOP')] == [
      'IXI002-Guys-0828', 'IXI017-Guys-0698', 'IXI035-IOP-0873']
  [pair] = ixi.find_subjects(ixi_root, 'PD', 'T1', 'HH')
  assert pair.target.name == 'IXI012-HH-1211-PD.nii.gz'
  assert pair.reference.name == 'IXI012-HH-1211-T1.nii.gz'


def test_pd_shares_the_t2_grid_and_is_taken_as_stored(ixi_root, monkeypatch):
  def no_resampling(*args):
    raise AssertionError('PD on the T2 grid was resampled')
  monkeypatch.setattr(volumes, 'resample_onto', no_resampling)
  pair = ixi.find_subjects(ixi_root)[0]
  reference, target = volumes.prepare_pair(pair, 64, align_by_headers=True)
  np.testing.assert_array_equal(
      reference, volumes.robust_scale(volumes.load_axial_slices(pair.reference), 99.5,
                                      pair.reference)[:, 8:72])  # 80 rows cropped to 64
  assert target.shape == (30, 64, 64)


def test_t1_is_resampled_onto_the_t2_grid_through_the_affines(ixi_root):
  pair = ixi.find_subjects(ixi_root, reference='T1')[0]
  reference, target = volumes.load_pair(pair, align_by_headers=True)
  # What a T1 scan on the T2 grid would have held, in the same axial orientation.
  expected = volumes.axial_slices(scan(AXIAL[1], AXIAL[0], 'T1').astype(np.float32), AXIAL[0],
                                  pair.reference)
  assert reference.shape == target.shape == expected.shape == (30, 80, 64)
  inside = expected > 50  # the head; its edge is where the interpolation errs most
  error = np.abs(reference - expected)[inside].mean() / expected[inside].mean()
  # Measured 0.0013 (linear interpolation of a 1.6 mm grid); the same result shifted by one
  # voxel 0.059, or flipped left-right 0.13.
  assert error < 0.02, error
  # BraTS-style refusal where the data set does not allow alignment.
  with pytest.raises(DataError, match='differ in shape .* register them to one grid first'):
    volumes.load_pair(pair, align_by_headers=False)


def test_volumes_that_do_not_overlap_are_refused_naming_both(tmp_path):
  elsewhere = SAGITTAL[0].copy()
  elsewhere[:3, 3] += 500  # another patient position entirely
  target = write(tmp_path / 'IXI100-HH-0001-T2.nii.gz', 'T2')
  reference = write(tmp_path / 'IXI100-HH-0001-T1.nii.gz', 'T1', (elsewhere, SAGITTAL[1]))
  [pair] = ixi.find_subjects(tmp_path, reference='T1')
  with pytest.raises(DataError, match=(f'{reference} and {target}: by their headers the two '
                                       'volumes do not overlap')):
    volumes.load_pair(pair, align_by_headers=True)


def test_a_reference_over_a_shorter_stretch_guides_only_the_slices_it_reaches(tmp_path):
  """As IXI014-HH-1236, whose PD has 29 slices against its T2's 112."""
  short = AXIAL[0].copy()
  short[2, 3] += 10 * 3.0  # starts 10 slices up, 10 slices long
  write(tmp_path / 'IXI-T2' / 'IXI014-HH-1236-T2.nii.gz', 'T2')
  write(tmp_path / 'IXI-PD' / 'IXI014-HH-1236-PD.nii.gz', 'PD', (short, (64, 80, 10)))
  config = _config(tmp_path, dataset='ixi', cache_dir=str(tmp_path / 'cache'))
  source = pipeline.make_source(config, 'train')  # one subject: all of it trains
  reached = [source.record(i).index for i in range(len(source))]
  assert reached == list(range(10, 20))
  for i in range(len(source)):  # every slice has its guide
    assert source[i]['aux'].mean() > 0.05


def test_bad_ixi_settings_and_folders_are_named(ixi_root, tmp_path):
  with pytest.raises(DataError, match="target_contrast='FLAIR': IXI has T1, T2, PD"):
    ixi.find_subjects(ixi_root, target='FLAIR')
  with pytest.raises(DataError, match="both 'T2'"):
    ixi.find_subjects(ixi_root, reference='T2')
  with pytest.raises(DataError, match="sites='HH,Oxford': unknown site Oxford"):
    ixi.find_subjects(ixi_root, sites='HH,Oxford')
  with pytest.raises(DataError, match='no such data folder'):
    ixi.find_subjects(tmp_path / 'absent')
  with pytest.raises(DataError, match='no IXI subject of Guys/HH/IOP with both a T2 and a PD'):
    ixi.find_subjects(tmp_path)
  write(tmp_path / 'a' / 'IXI002-Guys-0828-T2.nii.gz', 'T2')
  write(tmp_path / 'b' / 'IXI002-Guys-0828-T2.nii.gz', 'T2')
  write(tmp_path / 'a' / 'IXI002-Guys-0828-PD.nii.gz', 'PD')
  with pytest.raises(DataError, match=r'subject IXI002-Guys-0828 has 2 T2 volumes'):
    ixi.find_subjects(tmp_path)


def _config(root, **data):
  config = default.get_config()
  config.data.update({'root': str(root), 'image_size': 64, 'min_foreground': 0.1,
                      'test_fraction': 0.25, **data})
  return config


def test_the_pipeline_reads_ixi_with_a_subject_level_split_file(ixi_root, tmp_path):
  split_file = tmp_path / 'ixi_split.json'
  config = _config(ixi_root, dataset='ixi', reference_contrast='T1', split_file=str(split_file),
                   cache_dir=str(tmp_path / 'cache'), test_fraction=0.4)
  train, test = (pipeline.make_source(config, split) for split in ('train', 'test'))
  split = json.loads(split_file.read_text())
  # Every subject is split, whatever contrasts it has (IXI013-HH-1212 has T2 alone): runs
  # guided by PD and by T1 test on the same subjects.
  assert sorted(split['train'] + split['test']) == ixi.subject_names(ixi_root) == [
      'IXI002-Guys-0828', 'IXI012-HH-1211', 'IXI013-HH-1212', 'IXI017-Guys-0698',
      'IXI035-IOP-0873']
  complete = {p.name for p in ixi.find_subjects(ixi_root)}
  for source, names in ((train, split['train']), (test, split['test'])):
    assert {source.record(i).subject for i in range(len(source))} == set(names) & complete
  assert test.record(0).volume.endswith('-T2.nii.gz')  # the test mask is seeded from the target
  config.data.reference_contrast = 'PD'  # the same split file, another guide
  by_pd = pipeline.make_source(config, 'test')
  assert {by_pd.record(i).subject for i in range(len(by_pd))} == set(split['test']) & complete
  assert repr(by_pd).startswith('IxiSlices(')
  batch = next(iter(pipeline.make_loader(config, 'test', batch_size=2)))
  assert batch['target'].shape == batch['aux'].shape == (2, 64, 64, 1)
  assert np.isfinite(batch['target_under']).all() and batch['aux'].std() > 0.1


def test_nifti_pairs_take_each_subject_folder_by_two_patterns(tmp_path):
  root = tmp_path / 'mine'
  for subject in ('sub-01', 'sub-02'):
    write(root / subject / f'{subject}_T2w.nii.gz', 'T2')
    write(root / subject / f'{subject}_T1w.nii.gz', 'T1', SAGITTAL)
  (root / 'derivatives').mkdir()  # a folder with neither: ignored
  config = _config(root, dataset='nifti_pairs', target_glob='*_T2w.nii.gz',
                   reference_glob='*_T1w.nii.gz', test_fraction=0.5,
                   cache_dir=str(tmp_path / 'cache'))
  pairs, aligned = pipeline.volume_pairs(config.data)
  assert aligned and [p.name for p in pairs] == ['sub-01', 'sub-02']
  assert pairs[0].target.name == 'sub-01_T2w.nii.gz'
  source = pipeline.make_source(config, 'train')
  assert repr(source).startswith('NiftiPairSlices(1 subjects')
  middle = source[len(source) // 2]
  reference, target = middle['aux'], middle['target']
  assert reference.shape == target.shape == (64, 64) and reference.max() > 0.5

  write(root / 'sub-02' / 'sub-02_run-2_T2w.nii.gz', 'T2')
  with pytest.raises(DataError, match=r'sub-02: expected one target volume \(\*_T2w.nii.gz\), '
                                      'found 2'):
    pipeline.volume_pairs(config.data)
  config.data.reference_glob = ''
  with pytest.raises(DataError, match='config.data.reference_glob: give the file name pattern'):
    pipeline.volume_pairs(config.data)


def test_a_singular_affine_is_named(tmp_path):
  image = nib.Nifti1Image(np.ones((8, 8, 3), np.float32), np.eye(4))
  image.set_sform(np.diag([1.0, 0.0, 1.0, 1.0]), code=1)  # a zero voxel size: no geometry
  image.set_qform(None, code=0)
  nib.save(image, str(tmp_path / 'flat.nii.gz'))
  with pytest.raises(DataError, match="flat.nii.gz: its voxel-to-world affine is singular"):
    volumes.read_volume(tmp_path / 'flat.nii.gz')
