"""The demo data generator: real formats, a real brain's anatomy, deterministic, never
overwrites."""

import csv
import math
import sys

import h5py
import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from fsmnet_jax import train
from fsmnet_jax.cli.make_demo_data import main
from fsmnet_jax.configs import tiny
from fsmnet_jax.data import brain_template, brats, demo, fastmri, ixi, kspace, m4raw, volumes
from fsmnet_jax.data.demo import COILS, INT16_SCALE, M4RAW_REPETITIONS, make_demo_data
from fsmnet_jax.data.phantoms import head_phantom
from training_runs import SPATIAL_BRANCH


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


@pytest.fixture(scope='module')
def layouts(tmp_path_factory):
  """Every layout at 32 px, 8 slices: 4 IXI subjects, 2 multi-coil knee pairs, 2 M4Raw."""
  return make_demo_data(tmp_path_factory.mktemp('layouts') / 'data', seed=4, num_subjects=4,
                        num_knee_pairs=1, image_size=32, num_slices=8)


def test_ixi_m4raw_and_multicoil_knee_are_written_as_downloaded(layouts):
  pairs = ixi.find_subjects(layouts / 'ixi', 'T2', 'T1')
  assert [p.name for p in pairs] == ['IXI002-Guys-0828', 'IXI003-HH-0845', 'IXI004-IOP-0862',
                                     'IXI005-Guys-0879']
  assert pairs[0].target == layouts / 'ixi/IXI-T2/IXI002-Guys-0828-T2.nii.gz'
  t2, t1 = (nib.load(str(path)) for path in (pairs[0].target, pairs[0].reference))
  pd = nib.load(str(layouts / 'ixi/IXI-PD/IXI002-Guys-0828-PD.nii.gz'))
  assert t2.get_data_dtype() == t1.get_data_dtype() == np.int16
  assert (pd.shape, nib.aff2axcodes(pd.affine)) == (t2.shape, nib.aff2axcodes(t2.affine))
  np.testing.assert_array_equal(pd.affine, t2.affine)  # one dual-echo acquisition
  assert nib.aff2axcodes(t2.affine) == ('L', 'P', 'S') and t2.shape == (32, 32, 8)
  assert nib.aff2axcodes(t1.affine) == ('P', 'I', 'R')  # sagittal, finer voxels
  assert np.abs(t1.affine[:3, :3]).sum(axis=0).max() < np.abs(t2.affine[:3, :3]).sum(axis=0).min()

  train_pairs = m4raw.find_pairs(layouts / 'm4raw', 'train', 'T2', 'T1', repetition=0)
  test_pairs = m4raw.find_pairs(layouts / 'm4raw', 'test', 'FLAIR', 'T1', repetition=2)
  assert [p.subject for p in train_pairs + test_pairs] == ['2022061001', '2022101101']
  assert [len(train_pairs[0].target), len(test_pairs[0].target)] == [M4RAW_REPETITIONS['T2'], 1]
  first, second = (fastmri.read_kspace_slice(path, 4) for path in train_pairs[0].target[:2])
  assert first.shape == (COILS, 32, 32) and first.dtype == np.complex64
  assert not np.allclose(first, second)  # each repetition is a scan with its own noise

  knee = fastmri.read_pairs(layouts / 'fastmri_multicoil/pairs.csv', layouts / 'fastmri_multicoil',
                            multicoil=True)
  assert [(p.reference[0].stem, p.target[0].stem) for p in knee] == [
      ('file_demo_mc0000', 'file_demo_mc0001'), ('file_demo_mc0002', 'file_demo_mc0003')]
  with h5py.File(knee[0].target[0]) as f:
    assert f['kspace'].shape == (8, COILS, 64, 32)  # the readout oversampled 2x, as fastMRI's
    np.testing.assert_allclose(f['reconstruction_rss'][()], kspace.zero_filled(
        f['kspace'][()], size=(32, 32), coils=True))
  assert fastmri.read_header(knee[0].target[0]) == {'encoding_size': (64, 32),
                                                   'recon_size': (32, 32)}


def _correlation_in_head(a, b):
  inside = b > 0.05
  return float(np.corrcoef(a[inside], b[inside])[0, 1])


def test_the_ixi_t1_aligns_onto_its_t2_through_the_headers(tmp_path):
  root = make_demo_data(tmp_path / 'data', seed=0, num_subjects=0, num_knee_pairs=0,
                        image_size=32, num_slices=8, num_ixi_subjects=1, num_multicoil_pairs=0,
                        num_m4raw_subjects=0)
  # The first IXI subject's anatomy: the first draw from the IXI layout's generator.
  truth = head_phantom((8, 32, 32), np.random.default_rng((0, 1)))
  t1, t2 = volumes.load_pair(ixi.find_subjects(root / 'ixi', 'T2', 'T1')[0],
                             align_by_headers=True)
  np.testing.assert_allclose(t2 / INT16_SCALE, truth['t2'], atol=0.5 / INT16_SCALE)
  # Measured over seeds 0-2: 0.84-0.85 (linear interpolation onto the sagittal grid and back
  # blurs the phantom's sharp edges); half a pixel off in any axis 0.51-0.61, one pixel 0.13-0.20.
  assert _correlation_in_head(t1, truth['t1']) > 0.8
  assert _correlation_in_head(ndimage.shift(t1, (0, 0.5, 0), order=1), truth['t1']) < 0.7


@pytest.mark.parametrize('layout', list(demo.LAYOUT_SETTINGS))
def test_each_layout_trains_from_its_files(layouts, layout, tmp_path):
  config = tiny.get_config()
  config.model.update(SPATIAL_BRANCH)  # the data path is under test, not the network
  config.data.update(demo.layout_settings(layouts, layout))
  config.data.cache_dir = str(tmp_path / 'cache')
  config.train.update(num_steps=2, log_every=1, checkpoint_every=1000)
  config.eval.update(every=1000, batch_size=4)  # the whole test split: no slice left out
  metrics = train.train_and_evaluate(config, str(tmp_path / 'workdir'))
  assert math.isfinite(metrics['eval_psnr']) and metrics['eval_psnr'] > 0


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
