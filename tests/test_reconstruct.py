"""fsmnet-reconstruct: NIfTI in and out on the input's grid, fastMRI k-space in, h5 out."""

import os
import signal
from pathlib import Path

import h5py
import jax
import nibabel as nib
import numpy as np
import pytest

from fsmnet_jax.configs import tiny
from fsmnet_jax import reconstruct
from fsmnet_jax.checkpoint import save_variables
from fsmnet_jax.cli import reconstruct as reconstruct_cli
from fsmnet_jax.data import DataError, kspace, volumes
from fsmnet_jax.data.demo import make_demo_data
from fsmnet_jax.data.masks import sampling_mask
from fsmnet_jax.data.phantoms import head_phantom
from fsmnet_jax.inference import Reconstructor
from fsmnet_jax.model import FSMNet, init_variables

REPO = Path(__file__).resolve().parents[1]

# Voxel-to-world matrices: RAS, LPS with other spacings, and axes permuted (P, I, R).
AFFINES = {
    'RAS': np.diag([1.0, 1.0, 2.5, 1.0]),
    'LPS': np.array([[-0.9, 0, 0, 10], [0, -0.9, 0, 20], [0, 0, 1.5, -5], [0, 0, 0, 1]]),
    'PIR': np.array([[0, 0, 1.2, 0], [-1.0, 0, 0, 0], [0, -1.1, 0, 3], [0, 0, 0, 1]]),
}


def _write_nifti(path, data, affine, dtype=np.int16):
  image = nib.Nifti1Image(data.astype(dtype), affine)
  image.header['descrip'] = b'site A scanner 3T'
  image.header.set_xyzt_units('mm', 'sec')
  image.set_qform(affine, code=1)
  image.set_sform(affine, code=2)
  nib.save(image, str(path))
  return path


def _volume(rng, shape):
  # A blob with texture: positive inside, zero outside (as skull-stripped BraTS).
  grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing='ij'))
  inside = (grid**2).sum(0) < 0.8
  return inside * (300 + 500 * rng.random(shape))


@pytest.fixture(scope='module')
def data_config():
  return tiny.get_config().data


@pytest.fixture(scope='module')
def reconstructor():
  model = FSMNet(**tiny.get_config().model)
  return Reconstructor(model, init_variables(model, jax.random.key(0))['params'], batch_size=4)


def _reference_as_output(target_under, aux):
  """A stand-in model whose output is its reference input: makes the output predictable."""
  del target_under
  return aux


@pytest.mark.parametrize('orientation', AFFINES)
def test_to_file_layout_inverts_load_axial_slices(tmp_path, orientation):
  data = np.random.default_rng(0).random((9, 10, 11)).astype(np.float32)
  path = _write_nifti(tmp_path / 'v.nii.gz', data, AFFINES[orientation], np.float32)
  slices = volumes.load_axial_slices(path)
  np.testing.assert_array_equal(volumes.to_file_layout(slices, AFFINES[orientation]), data)


@pytest.mark.parametrize('orientation', ['LPS', 'PIR'])
def test_nifti_output_is_on_the_input_grid_with_its_header(tmp_path, data_config, orientation):
  rng = np.random.default_rng(1)
  affine = AFFINES[orientation]
  t1 = _write_nifti(tmp_path / 't1.nii.gz', _volume(rng, (28, 30, 9)), affine)
  t2 = _write_nifti(tmp_path / 't2.nii.gz', _volume(rng, (28, 30, 9)), affine)
  out = tmp_path / 'recon.nii.gz'
  result = reconstruct.reconstruct_nifti(_reference_as_output, data_config, t1, t2, out,
                                         acceleration=4, seed=3)
  written, source = nib.load(str(out)), nib.load(str(t2))
  assert written.shape == source.shape and written.get_data_dtype() == np.float32
  np.testing.assert_array_equal(written.affine, source.affine)
  for field in ('pixdim', 'descrip', 'xyzt_units', 'qform_code', 'sform_code', 'srow_x'):
    np.testing.assert_array_equal(written.header[field], source.header[field])
  # The output is the (scaled) reference: back on the T2 grid voxel for voxel, in T2 units.
  percentile = data_config.percentile
  t1_data, t2_data = (nib.load(str(p)).get_fdata() for p in (t1, t2))
  expected = (np.clip(t1_data / volumes.intensity_scale(t1_data, percentile, t1), 0, 1)
              * volumes.intensity_scale(t2_data, percentile, t2))
  np.testing.assert_allclose(written.get_fdata(), expected, rtol=1e-5, atol=1e-3)
  mask = np.load(reconstruct.mask_path(out))
  np.testing.assert_array_equal(mask, result.mask)
  np.testing.assert_array_equal(mask, sampling_mask(data_config, (32, 32), 3))
  assert result.psnr['zero_filled'] > 10


def test_real_model_reconstruction_and_its_seeded_mask(tmp_path, data_config, reconstructor):
  rng = np.random.default_rng(2)
  t1 = _write_nifti(tmp_path / 't1.nii', _volume(rng, (32, 32, 5)), AFFINES['RAS'])
  t2 = _write_nifti(tmp_path / 't2.nii', _volume(rng, (32, 32, 5)), AFFINES['RAS'])
  first = reconstruct.reconstruct_nifti(reconstructor, data_config, t1, t2,
                                        tmp_path / 'a.nii.gz', acceleration=8, seed=5)
  again = reconstruct.reconstruct_nifti(reconstructor, data_config, t1, t2,
                                        tmp_path / 'b.nii.gz', acceleration=8, seed=5,
                                        with_data_consistency=True)
  other = reconstruct.reconstruct_nifti(reconstructor, data_config, t1, t2,
                                        tmp_path / 'c.nii.gz', acceleration=8, seed=6)
  np.testing.assert_array_equal(first.mask, again.mask)
  assert not np.array_equal(first.mask, other.mask)
  assert 6 < first.mask.size / first.mask.sum() < 12  # 8x: 3 of 32 lines here
  assert np.isfinite(first.image).all() and first.image.std() > 0
  assert not np.allclose(first.image, again.image)  # data consistency changed the output
  assert nib.load(str(tmp_path / 'a.nii.gz')).shape == (32, 32, 5)


def test_nifti_input_errors(tmp_path, data_config):
  rng = np.random.default_rng(3)
  affine = AFFINES['RAS']
  t2 = _write_nifti(tmp_path / 't2.nii.gz', _volume(rng, (16, 16, 4)), affine)
  cases = {
      'differ in size': _write_nifti(tmp_path / 'small.nii.gz', _volume(rng, (16, 16, 3)),
                                     affine),
      'differ in orientation': _write_nifti(tmp_path / 'flipped.nii.gz',
                                            _volume(rng, (16, 16, 4)), AFFINES['LPS']),
      'differ in voxel-to-world affine': _write_nifti(
          tmp_path / 'shifted.nii.gz', _volume(rng, (16, 16, 4)),
          affine + np.array([[0, 0, 0, 4.0], [0] * 4, [0] * 4, [0] * 4])),
  }
  for message, t1 in cases.items():
    with pytest.raises(DataError, match=message):
      reconstruct.reconstruct_nifti(_reference_as_output, data_config, t1, t2,
                                    tmp_path / 'out.nii.gz', 4, 0)
  broken = tmp_path / 'broken.nii.gz'
  broken.write_bytes(t2.read_bytes()[:200])
  with pytest.raises(DataError, match='broken.nii.gz: not a readable NIfTI'):
    reconstruct.reconstruct_nifti(_reference_as_output, data_config, broken, t2,
                                  tmp_path / 'out.nii.gz', 4, 0)
  with pytest.raises(DataError, match='no sampling mask is defined for acceleration 6'):
    reconstruct.reconstruct_nifti(_reference_as_output, data_config, t2, t2,
                                  tmp_path / 'out.nii.gz', 6, 0)
  assert not (tmp_path / 'out.nii.gz').exists()
  existing = tmp_path / 'existing.nii.gz'
  existing.write_bytes(b'the user\'s file')
  with pytest.raises(FileExistsError, match='pass --overwrite'):
    reconstruct.reconstruct_nifti(_reference_as_output, data_config, t2, t2, existing, 4, 0)
  assert existing.read_bytes() == b'the user\'s file'
  reconstruct.reconstruct_nifti(_reference_as_output, data_config, t2, t2, existing, 4, 0,
                                overwrite=True)
  assert nib.load(str(existing)).shape == (16, 16, 4)
  # --overwrite replaces earlier outputs, not a folder that stands where one would go.
  for out in (tmp_path / 'folder.nii.gz', tmp_path / 'folder_for_the_mask.nii.gz'):
    folder = out if out.name == 'folder.nii.gz' else reconstruct.mask_path(out)
    (folder / 'kept').mkdir(parents=True)
    with pytest.raises(FileExistsError, match=f'{folder}: is a folder, and this output is a '
                                              'file; --overwrite replaces only an earlier output'):
      reconstruct.reconstruct_nifti(_reference_as_output, data_config, t2, t2, out, 4, 0,
                                    overwrite=True)
    assert (folder / 'kept').is_dir()


def test_a_t1_on_another_grid_is_aligned_by_the_headers_when_asked(tmp_path, data_config):
  root = make_demo_data(tmp_path / 'data', seed=0, num_subjects=0, num_knee_pairs=0,
                        image_size=32, num_slices=8, num_ixi_subjects=1, num_multicoil_pairs=0,
                        num_m4raw_subjects=0)
  t1, t2 = (root / 'ixi' / f'IXI-{c}' / f'IXI002-Guys-0828-{c}.nii.gz' for c in ('T1', 'T2'))
  out = tmp_path / 'recon.nii.gz'
  with pytest.raises(DataError, match=r'T1 and T2 differ in size .* first \(or align it by the '
                                      r'headers: --align-by-headers\)'):
    reconstruct.reconstruct_nifti(_reference_as_output, data_config, t1, t2, out, 4, 0)
  assert not out.exists()
  reconstruct.reconstruct_nifti(_reference_as_output, data_config, t1, t2, out, 4, 0,
                                align_by_headers=True)
  written, source = nib.load(str(out)), nib.load(str(t2))
  assert written.shape == source.shape == (32, 32, 8)
  np.testing.assert_array_equal(written.affine, source.affine)
  # The output is the T1 on the T2 grid: where the subject's T1 anatomy is (the IXI layout's
  # first draw). Measured over seeds 0-2: 0.84-0.85; one pixel off 0.12-0.20.
  truth = head_phantom((8, 32, 32), np.random.default_rng((0, 1)))['t1']
  output = volumes.load_axial_slices(out)
  inside = truth > 0.05
  assert np.corrcoef(output[inside], truth[inside])[0, 1] > 0.8


@pytest.fixture(scope='module')
def knee(tmp_path_factory):
  root = make_demo_data(tmp_path_factory.mktemp('knee') / 'data', seed=0, num_subjects=1,
                        num_knee_pairs=1, image_size=32, num_slices=4)
  pd, pdfs = (root / 'fastmri' / f'file_demo000{i}.h5' for i in (0, 1))
  return pd, pdfs


def test_kspace_reconstruction_writes_fastmri_h5(tmp_path, data_config, reconstructor, knee):
  from fastmri.utils import save_reconstructions  # pylint: disable=import-outside-toplevel
  pd, pdfs = knee
  with pytest.raises(DataError, match='fully sampled and has no "mask"; pass --acceleration'):
    reconstruct.reconstruct_kspace(reconstructor, data_config, pdfs, pd, tmp_path / 'r.h5',
                                   None, 0)
  result = reconstruct.reconstruct_kspace(reconstructor, data_config, pdfs, pd,
                                          tmp_path / 'r.h5', 4, 0)
  save_reconstructions({'fastmri.h5': result.image}, tmp_path / 'fastmri_made')
  with h5py.File(tmp_path / 'r.h5') as ours, h5py.File(tmp_path / 'fastmri_made/fastmri.h5') as \
      theirs, h5py.File(pdfs) as target:
    assert set(ours) == set(theirs) == {'reconstruction'}
    assert ours['reconstruction'].dtype == theirs['reconstruction'].dtype == np.float32
    assert ours['reconstruction'].shape == target['reconstruction_esc'].shape
    np.testing.assert_array_equal(ours['reconstruction'][()], theirs['reconstruction'][()])
  assert set(result.psnr) == {'zero_filled', 'fsmnet'}  # simulated: the truth is known
  reconstruct.reconstruct_kspace(reconstructor, data_config, pdfs, pd, tmp_path / 'n.nii.gz',
                                 4, 0)
  assert nib.load(str(tmp_path / 'n.nii.gz')).shape == (32, 32, 4)


def test_kspace_reconstruction_uses_only_measured_lines(tmp_path, data_config, knee):
  pd, pdfs = knee
  with h5py.File(pdfs) as f:
    full = f['kspace'][()]
  line_mask = np.zeros(full.shape[-1], np.float32)
  line_mask[::3] = 1
  line_mask[14:18] = 1
  measured = (full * line_mask).astype(np.complex64)
  for name, with_mask in (('test_style.h5', True), ('zeros_only.h5', False)):
    with h5py.File(tmp_path / name, 'w') as f:  # as fastMRI's test set: unmeasured lines zero
      f['kspace'] = measured
      if with_mask:
        f['mask'] = line_mask.astype(bool)
    result = reconstruct.reconstruct_kspace(
        lambda under, aux: under, data_config, tmp_path / name, pd, tmp_path / f'out_{name}',
        acceleration=8, seed=0, with_data_consistency=True)
    np.testing.assert_array_equal(result.mask, np.broadcast_to(line_mask, full.shape[1:]))
    np.testing.assert_allclose(result.zero_filled, kspace.zero_filled(measured, size=32),
                               rtol=1e-6)
    # The zero-filled image is its own data-consistent version: the full-grid step keeps it.
    np.testing.assert_allclose(result.image, result.zero_filled,
                               atol=1e-5 * result.zero_filled.max())
    assert result.psnr == {}  # nothing to compare with: the data were measured undersampled


def test_kspace_input_errors(tmp_path, data_config, knee):
  pd, pdfs = knee
  with h5py.File(tmp_path / 'fewer.h5', 'w') as f, h5py.File(pdfs) as source:
    f['kspace'] = source['kspace'][:2]
  with pytest.raises(DataError, match='4 vs 2 slices'):
    reconstruct.reconstruct_kspace(_reference_as_output, data_config, pdfs,
                                   tmp_path / 'fewer.h5', tmp_path / 'o.h5', 4, 0)
  with h5py.File(tmp_path / 'magnitude.h5', 'w') as f:
    f['kspace'] = np.zeros((4, 32, 32), np.float32)
  with pytest.raises(DataError, match='magnitude.h5: "kspace" must be complex'):
    reconstruct.reconstruct_kspace(_reference_as_output, data_config, tmp_path / 'magnitude.h5',
                                   pd, tmp_path / 'o.h5', 4, 0)
  big = data_config.copy_and_resolve_references()
  big.image_size = 64
  with pytest.raises(DataError, match='smaller than the model\'s image size 64'):
    reconstruct.reconstruct_kspace(_reference_as_output, big, pdfs, pd, tmp_path / 'o.h5', 4, 0)
  with pytest.raises(DataError, match='name the output .h5'):
    reconstruct.reconstruct_kspace(_reference_as_output, data_config, pdfs, pd,
                                   tmp_path / 'o.png', 4, 0)


@pytest.fixture
def cli_inputs(tmp_path):
  """(--checkpoint and --config arguments of tiny weights, a T1 and a T2 NIfTI file)."""
  model = FSMNet(**tiny.get_config().model)
  checkpoint = save_variables(init_variables(model, jax.random.key(1)), tmp_path / 'weights')
  rng = np.random.default_rng(4)
  t1 = _write_nifti(tmp_path / 't1.nii.gz', _volume(rng, (32, 32, 3)), AFFINES['RAS'])
  t2 = _write_nifti(tmp_path / 't2.nii.gz', _volume(rng, (32, 32, 3)), AFFINES['RAS'])
  return ['--checkpoint', str(checkpoint), '--config', str(REPO / 'configs/tiny.py')], t1, t2


def test_cli(tmp_path, capsys, knee, cli_inputs):
  common, t1, t2 = cli_inputs
  assert reconstruct_cli.main([*common, '--t1', str(t1), '--t2', str(t2), '--acceleration', '4',
                               '--out', str(tmp_path / 'recon.nii.gz')]) == 0
  printed = capsys.readouterr().out
  assert 'recon.nii.gz (3 slices of 32x32' in printed and 'recon_mask.npy' in printed
  assert 'zero-filled' in printed and 'dB' in printed
  pd, pdfs = knee
  assert reconstruct_cli.main([*common, '--kspace', str(pdfs), '--reference', str(pd),
                               '--acceleration', '4', '--data-consistency', '--precision',
                               'bf16', '--out', str(tmp_path / 'knee.h5')]) == 0
  assert (tmp_path / 'knee_mask.npy').is_file()
  with h5py.File(tmp_path / 'knee.h5') as f:
    assert f['reconstruction'].dtype == np.float32
  assert reconstruct_cli.main([*common, '--t1', str(t1), '--kspace', str(pdfs),
                               '--out', str(tmp_path / 'x.nii.gz')]) == 2
  assert reconstruct_cli.main([*common, '--t1', str(t1), '--t2', str(t2), '--acceleration',
                               '4', '--out', str(tmp_path / 'recon.nii.gz')]) == 2
  errors = capsys.readouterr().err
  assert 'fsmnet-reconstruct: error: --t2 goes with --t1, --kspace with --reference' in errors
  assert 'recon.nii.gz' in errors and 'already exists' in errors
  assert 'Traceback' not in errors


def test_sigterm_while_writing_keeps_the_old_outputs_whole(tmp_path, capsys, monkeypatch,
                                                           cli_inputs):
  common, t1, t2 = cli_inputs
  out = tmp_path / 'out' / 'recon.nii.gz'
  arguments = [*common, '--t1', str(t1), '--t2', str(t2), '--out', str(out)]
  assert reconstruct_cli.main([*arguments, '--acceleration', '4']) == 0
  before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
  assert sorted(before) == ['recon.nii.gz', 'recon_mask.npy']
  save = np.save

  def save_then_sigterm(path, array):  # the new image is written, the mask half-way
    save(path, array)
    os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(np, 'save', save_then_sigterm)
  assert reconstruct_cli.main([*arguments, '--acceleration', '8', '--overwrite']) == 143
  assert capsys.readouterr().err.strip().splitlines()[-1] == (
      'fsmnet-reconstruct: stopped by SIGTERM; outputs not finished were removed')
  assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before
