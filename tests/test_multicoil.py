"""Multi-coil k-space (M4Raw, fastMRI multi-coil knee): files in their layout, written by the
demo's writer from a known image and known coil sensitivities, read into pairs, combined by
root-sum-of-squares, undersampled with one mask for every coil."""

import h5py
import numpy as np
import pytest

from fsmnet_jax import evaluate, metrics, reconstruct
from fsmnet_jax.configs import default
from fsmnet_jax.data import DataError, fastmri, kspace, m4raw, pipeline
from fsmnet_jax.data.demo import COILS, coil_sensitivities, write_multicoil_h5
from fsmnet_jax.data.phantoms import head_phantom


def test_root_sum_of_squares_of_the_coils_is_the_image():
  image = head_phantom((3, 48, 48), np.random.default_rng(0))['t2'][1]
  coil_kspace = kspace.fft2c(image[None] * coil_sensitivities(image.shape))
  np.testing.assert_allclose(kspace.zero_filled(coil_kspace, coils=True), image, atol=1e-5)
  mask = np.zeros((48, 48))
  mask[:, ::3] = 1
  under = kspace.zero_filled(coil_kspace, mask, coils=True)
  each = [kspace.zero_filled(k, mask) for k in coil_kspace]
  np.testing.assert_allclose(under, np.sqrt(np.sum(np.square(each), axis=0)), rtol=1e-5)
  assert np.abs(under - image).mean() > 0.3 * image.mean()  # measured 0.83: 3x aliasing


@pytest.fixture(scope='module')
def m4raw_root(tmp_path_factory):
  """M4Raw's folders: subjects with T1 x3, T2 x3, FLAIR x2; one without T1."""
  root = tmp_path_factory.mktemp('M4Raw')
  rng = np.random.default_rng(1)
  for folder, subjects in (('multicoil_train', ('2022061001', '2022061002', '2022061003')),
                           ('multicoil_val', ('2022101101',))):
    for subject in subjects:
      anatomy = head_phantom((6, 32, 32), rng)
      np.save(root / f'{folder}_{subject}_T2_noise_free.npy', anatomy['t2'])
      for contrast, repetitions in (('T1', 3), ('T2', 3), ('FLAIR', 2)):
        if subject == '2022061003' and contrast == 'T1':
          continue
        for k in range(1, repetitions + 1):
          noisy = anatomy[contrast.lower() if contrast != 'FLAIR' else 'pd'] \
              + 0.02 * rng.normal(size=(6, 32, 32))
          write_multicoil_h5(root / folder / f'{subject}_{contrast}{k:02d}.h5', noisy)
  return root


def test_m4raw_pairs_the_contrasts_of_each_subject(m4raw_root):
  pairs = m4raw.find_pairs(m4raw_root, 'train')
  assert [p.subject for p in pairs] == ['2022061001', '2022061002']  # 003 has no T1
  assert [p.name for p in pairs[0].target] == [f'2022061001_T2{k:02d}.h5' for k in (1, 2, 3)]
  assert [p.name for p in pairs[0].reference] == [f'2022061001_T1{k:02d}.h5' for k in (1, 2, 3)]
  assert pairs[0].num_slices == 6
  [second] = m4raw.find_pairs(m4raw_root, 'test', 'FLAIR', 'T2', repetition=2)
  assert second.target == (m4raw_root / 'multicoil_val' / '2022101101_FLAIR02.h5',)


def test_m4raw_settings_and_files_that_cannot_be_used_are_named(m4raw_root, tmp_path):
  with pytest.raises(DataError, match="target_contrast='PD': M4Raw has T1, T2, FLAIR"):
    m4raw.find_pairs(m4raw_root, 'train', target='PD')
  with pytest.raises(DataError, match='subject 2022101101 has no FLAIR repetition 3 '
                                      r'\(it has \[1, 2\]\)'):
    m4raw.find_pairs(m4raw_root, 'test', 'FLAIR', 'T2', repetition=3)
  with pytest.raises(DataError, match='multicoil_train: no such folder; config.data.root is'):
    m4raw.find_pairs(tmp_path, 'train')
  folder = tmp_path / 'multicoil_val'
  write_multicoil_h5(folder / '2022101101_T201.h5', np.ones((4, 32, 32)))
  write_multicoil_h5(folder / '2022101101_T101.h5', np.ones((4, 32, 40)))
  with pytest.raises(DataError, match=r"subject 2022101101's files differ in shape \(slices, "
                                      r"coils, rows, cols\): 2022101101_T201.h5 \(4, 4, 32, 32\)"):
    m4raw.find_pairs(tmp_path, 'test')
  with h5py.File(folder / '2022101102_T201.h5', 'w') as f:  # single-coil k-space
    f.create_dataset('kspace', data=np.ones((4, 32, 32), np.complex64))
  (folder / '2022101102_T101.h5').write_bytes((folder / '2022101102_T201.h5').read_bytes())
  (folder / '2022101101_T101.h5').unlink()
  with pytest.raises(DataError, match=r'2022101102_T\d01.h5: "kspace" must be complex '
                                      r'\(slices, coils, rows, cols\) for multi-coil data'):
    m4raw.find_pairs(tmp_path, 'test')


def _config(**data):
  config = default.get_config()
  config.data.update({'image_size': 32, 'acceleration': 4, 'center_fraction': 0.08, **data})
  return config


def test_the_pipeline_undersamples_every_coil_with_one_mask(m4raw_root):
  config = _config(dataset='m4raw', root=str(m4raw_root), target_contrast='T2',
                   reference_contrast='T1')
  source = pipeline.make_source(config, 'train')
  assert repr(source) == 'M4RawSlices(2 pairs, 12 slices, size 32, multi-coil)'
  element = source[3]
  assert element['kspace'].shape == (COILS, 32, 32)
  np.testing.assert_allclose(element['target'],
                             kspace.zero_filled(element['kspace'], size=32, coils=True))
  example = pipeline.Undersample(config.data, fixed_per_volume=True).random_map(
      element, np.random.default_rng(0))
  mask = example['mask']
  # 4x on 32 columns: 8% centre and random lines (measured 6 of 32), whole columns.
  assert 0.1 < mask.mean() < 0.45 and np.all(mask == mask[:1])
  expected = kspace.zero_filled(element['kspace'], mask, 32, coils=True)
  # The model's input is the zero-filled RSS image, normalised as the target is.
  restored = example['target_under'][..., 0] * example['std'] + example['mean']
  np.testing.assert_allclose(restored, expected, rtol=1e-4, atol=1e-5)
  # repetition=0: the three repetitions' k-space averaged, a third of the noise power.
  noise_free = np.load(m4raw_root / 'multicoil_train_2022061001_T2_noise_free.npy')[3]
  first = fastmri.read_kspace_slice(m4raw_root / 'multicoil_train' / '2022061001_T201.h5', 3)
  errors = [np.sqrt(np.mean((image - noise_free) ** 2)) for image in (
      element['target'], kspace.zero_filled(first, size=32, coils=True))]
  assert errors[0] < 0.75 * errors[1], errors  # measured: 0.0114 against 0.0194 (1/sqrt(3))
  batch = next(iter(pipeline.make_loader(config, 'test', batch_size=2)))
  assert batch['target_under'].shape == batch['aux'].shape == (2, 32, 32, 1)


def test_fastmri_multicoil_knee_pairs_crop_the_oversampled_readout(tmp_path):
  rng = np.random.default_rng(2)
  anatomy = head_phantom((3, 32, 32), rng)
  write_multicoil_h5(tmp_path / 'file1000001.h5', anatomy['pd'], readout_oversampling=2)
  write_multicoil_h5(tmp_path / 'file1000002.h5', anatomy['pdfs'], readout_oversampling=2)
  (tmp_path / 'pairs.csv').write_text('file1000001,file1000002,0.3\n')
  config = _config(dataset='fastmri_multicoil', root=str(tmp_path),
                   train_pairs=str(tmp_path / 'pairs.csv'), test_pairs=str(tmp_path / 'pairs.csv'))
  source = pipeline.make_source(config, 'test')
  assert repr(source) == 'KneeSlices(1 pairs, 3 slices, size 32, multi-coil)'
  element = source[1]
  assert element['kspace'].shape == (COILS, 64, 32)
  np.testing.assert_allclose(element['target'], anatomy['pdfs'][1], atol=1e-4)
  np.testing.assert_allclose(element['aux'], anatomy['pd'][1], atol=1e-4)
  config.data.dataset = 'fastmri'  # multi-coil files read as single-coil: refused, named
  with pytest.raises(DataError, match=r'file100000\d.h5: "kspace" must be complex '
                                      r'\(slices, rows, cols\) for single-coil'):
    pipeline.make_source(config, 'test')


def test_reconstruct_multicoil_kspace_gives_the_coils_combined_image(tmp_path):
  anatomy = head_phantom((3, 32, 32), np.random.default_rng(3))
  values = write_multicoil_h5(tmp_path / 't2.h5', anatomy['t2'])
  write_multicoil_h5(tmp_path / 't1.h5', anatomy['t1'])
  data = _config().data
  zero_filled_in = lambda under, aux: under  # the network's input comes back out
  result = reconstruct.reconstruct_kspace(zero_filled_in, data, tmp_path / 't2.h5',
                                          tmp_path / 't1.h5', tmp_path / 'out.h5', 4, seed=0)
  assert result.mask.shape == (32, 32) and 0.1 < result.mask.mean() < 0.45  # measured 6 of 32
  expected = kspace.zero_filled(values * result.mask, size=32, coils=True)
  np.testing.assert_allclose(result.image, expected, rtol=1e-5, atol=1e-6)
  with h5py.File(tmp_path / 'out.h5') as f:
    assert f['reconstruction'].shape == (3, 32, 32)
  # Simulated from fully-sampled coils: scored against their root-sum-of-squares, the image.
  assert result.psnr['zero_filled'] == pytest.approx(
      float(metrics.volume_psnr(anatomy['t2'], expected)), abs=1e-3)  # measured: equal
  with pytest.raises(DataError, match="t2.h5: multi-coil k-space; data consistency would need "
                                      "the coils' sensitivities"):
    reconstruct.reconstruct_kspace(zero_filled_in, data, tmp_path / 't2.h5', tmp_path / 't1.h5',
                                   tmp_path / 'dc.h5', 4, seed=0, with_data_consistency=True)
  assert not (tmp_path / 'dc.h5').exists()


def test_evaluation_with_data_consistency_is_refused_on_multicoil_data(m4raw_root, tmp_path):
  config = _config(dataset='m4raw', root=str(m4raw_root))
  with pytest.raises(DataError, match="dataset='m4raw': multi-coil data; data consistency would "
                                      "need the coils' sensitivities"):
    evaluate.evaluate(config, None, None, tmp_path / 'eval', with_data_consistency=True)
  assert not (tmp_path / 'eval').exists()
