"""Bad input to the command-line tools: one line naming the file and the problem, exit code 2,
no traceback, and nothing the user had modified.

fsmnet-reconstruct is driven in this process (its inputs cover NIfTI, fastMRI h5 and every
checkpoint kind); fsmnet-train and fsmnet-eval, whose flags are absl's, in subprocesses.
"""

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import jax
import nibabel as nib
import numpy as np
import pytest

from fsmnet_jax.configs import tiny
from fsmnet_jax.checkpoint import save_variables
from fsmnet_jax.cli import export as export_cli
from fsmnet_jax.cli import make_demo_data as make_demo_data_cli
from fsmnet_jax.cli import reconstruct as reconstruct_cli
from fsmnet_jax.data.demo import make_demo_data
from fsmnet_jax.model import FSMNet, init_variables
from training_runs import SPATIAL_ONLY

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {'fsmnet-train': ['--workdir', 'unused_workdir'],
            'fsmnet-eval': ['--checkpoint', 'unused_checkpoint']}


def _run(command: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
  script = Path(sys.executable).with_name(command)
  return subprocess.run([str(script), *args, *REQUIRED[command]], capture_output=True, text=True,
                        timeout=120, check=False, cwd=cwd)


def _error_lines(stderr: str) -> list[str]:
  # jax may log a line about the accelerators it looked for; everything else is ours.
  return [line for line in stderr.splitlines() if line and 'xla_bridge' not in line]


@pytest.mark.parametrize('command', sorted(REQUIRED))
def test_missing_config_file_is_one_line(command, tmp_path):
  done = _run(command, '--config', str(tmp_path / 'nowhere.py'), cwd=tmp_path)
  assert done.returncode == 2
  assert _error_lines(done.stderr) == [
      f"{command}: error: --config: [Errno 2] No such file or directory: "
      f"'{tmp_path / 'nowhere.py'}'"]
  assert not (tmp_path / 'unused_workdir').exists()


@pytest.mark.parametrize('command', sorted(REQUIRED))
def test_a_run_config_or_a_value_of_the_wrong_type_is_one_line(command, tmp_path):
  run_config = _write(tmp_path / 'config.json', b'{"model": {"use_spa_att": false}}')
  done = _run(command, '--config', str(run_config), cwd=tmp_path)
  assert done.returncode == 2
  assert _error_lines(done.stderr) == [
      f'{command}: error: --config: {run_config}: not a config file, a Python file with '
      "get_config() as configs/*.py (NameError: name 'false' is not defined); a run's "
      'config.json is read from the run itself: give the run as --checkpoint, or as --workdir '
      'to resume it']
  done = _run(command, '--config', str(ROOT / 'configs' / 'tiny.py'),
              '--config.train.num_steps=abc', cwd=tmp_path)
  assert done.returncode == 2
  assert _error_lines(done.stderr) == [
      f"{command}: error: flag --config.train.num_steps=abc: invalid literal for int() with "
      "base 10: 'abc'"]
  assert not (tmp_path / 'unused_workdir').exists()


@pytest.mark.parametrize('command', sorted(REQUIRED))
def test_unknown_config_key_is_one_line(command, tmp_path):
  done = _run(command, '--config', str(ROOT / 'configs' / 'default.py'),
              '--config.train.learning_rat=1e-3', cwd=tmp_path)
  assert done.returncode == 2
  assert _error_lines(done.stderr) == [
      f'{command}: error: --config.train.learning_rat: no such config key '
      f'(Did you mean "learning_rate" instead of "learning_rat"?)']
  assert not (tmp_path / 'unused_workdir').exists()


def test_a_run_refused_after_the_workdir_check_leaves_no_workdir(tmp_path):
  done = _run('fsmnet-train', '--config', str(ROOT / 'configs' / 'tiny.py'),
              '--config.data.dataset=bratz', cwd=tmp_path)
  assert done.returncode == 2
  assert _error_lines(done.stderr)[-1].startswith(
      "fsmnet-train: error: config.data.dataset: unknown data set 'bratz'")
  assert not (tmp_path / 'unused_workdir').exists()


def test_a_data_setting_the_data_set_does_not_read_is_one_line(tmp_path):
  done = _run('fsmnet-train', '--config', str(ROOT / 'configs' / 'brats_4x.py'),
              '--config.data.sites=HH', '--config.data.train_pairs=train.csv', cwd=tmp_path)
  assert done.returncode == 2
  assert _error_lines(done.stderr) == [
      "fsmnet-train: error: config.data.dataset='brats' does not read "
      "config.data.sites='HH' (read by ixi); config.data.train_pairs='train.csv' (read by "
      "fastmri, fastmri_multicoil): remove the setting or choose the data set"]
  assert not (tmp_path / 'unused_workdir').exists()


# --- fsmnet-reconstruct: each case writes one bad input and names the argument(s) it goes to. ---


@pytest.fixture(scope='module')
def good_inputs(tmp_path_factory):
  """Demo scans (one BraTS subject, one knee pair) and tiny weights, as files."""
  root = tmp_path_factory.mktemp('inputs')
  make_demo_data(root, seed=0, num_subjects=1, num_knee_pairs=1, image_size=32, num_slices=4)
  subject = root / 'brats' / 'DemoBraTS_000'
  model = FSMNet(**tiny.get_config().model)
  weights = save_variables(init_variables(model, jax.random.key(1)), root / 'weights')
  return {'t1': subject / 'DemoBraTS_000_t1.nii.gz', 't2': subject / 'DemoBraTS_000_t2.nii.gz',
          'reference': root / 'fastmri' / 'file_demo0000.h5',
          'kspace': root / 'fastmri' / 'file_demo0001.h5', 'checkpoint': weights,
          'config': ROOT / 'configs' / 'tiny.py'}


def _write(path, data: bytes):
  path.write_bytes(data)
  return path


def _mkdir(path):
  path.mkdir(parents=True)
  return path


def _h5_without_kspace(path):
  with h5py.File(path, 'w') as f:
    f['image'] = np.zeros((2, 8, 8), np.float32)
  return path


def _nifti(path, like, data):
  nib.save(nib.Nifti1Image(data, nib.load(str(like)).affine), str(path))
  return path


def _voxels(path):
  return np.asarray(nib.load(str(path)).dataobj).astype(np.float32)


def _with_voxel(good, value):
  data = _voxels(good['t2'])
  data[5, 7, 1] = value
  return data


def _kspace_file(path, good, edit, mask=None):
  with h5py.File(good['kspace']) as f:
    values = f['kspace'][()]
  with h5py.File(path, 'w') as f:
    f['kspace'] = edit(values)
    if mask is not None:
      f['mask'] = mask(values.shape[-1])
  return path


def _h5_with_a_kspace_group(path):
  with h5py.File(path, 'w') as f:
    f.create_group('kspace')
  return path


def _truncated(path, source):
  data = source.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  return path


def _torch_file(path, good, edit=lambda state_dict: state_dict, **save_options):
  torch = pytest.importorskip('torch')
  from fsmnet_jax.checkpoint import load_variables  # pylint: disable=import-outside-toplevel
  from torch_port.convert import flax_to_torch  # pylint: disable=import-outside-toplevel
  state_dict = edit(flax_to_torch(load_variables(good['checkpoint'])))
  if path.suffix == '.safetensors':
    from safetensors.torch import save_file  # pylint: disable=import-outside-toplevel
    save_file(dict(state_dict), str(path))
  else:
    torch.save({'network': state_dict, **save_options}, path)
  return path


class _RunsCode:
  """Unpickling this calls os.system: what weights_only=True must refuse."""

  def __reduce__(self):
    return os.system, ('echo unpickled code ran > /dev/null',)


def _orbax_copy(path, good, damage):
  shutil.copytree(good['checkpoint'], path)
  damage(path)
  return path


def _remove_metadata(folder):
  for metadata in folder.rglob('_METADATA'):
    metadata.unlink()


def _truncate_largest(folder):
  largest = max((p for p in folder.rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)
  _truncated(largest, largest)


def _first_conv_key(state_dict):
  return next(k for k, v in state_dict.items() if v.ndim == 4)


def _nan_in_first_conv(state_dict):
  key = _first_conv_key(state_dict)
  state_dict[key][0, 0, 0, 0] = float('nan')
  return state_dict


RECONSTRUCT_CASES = {
    # NIfTI: damaged files, wrong kinds, NaN/inf voxels, empty and tiny volumes, wrong dtypes.
    'truncated nii.gz': ('t2', lambda d, g: _truncated(d / 't2.nii.gz', g['t2']),
                         'not a readable NIfTI volume (EOFError'),
    'random bytes nii.gz': ('t2', lambda d, g: _write(d / 't2.nii.gz', os.urandom(3000)),
                            'not a readable NIfTI'),
    'empty nii.gz': ('t1', lambda d, g: _write(d / 't1.nii.gz', b''), 'not a readable NIfTI'),
    'h5 given as NIfTI': ('t2', lambda d, g: g['kspace'], 'not a readable NIfTI'),
    'missing file': ('t1', lambda d, g: d / 'nowhere.nii.gz', 'no such file'),
    'NaN voxel': ('t2', lambda d, g: _nifti(d / 't2.nii.gz', g['t2'], _with_voxel(g, np.nan)),
                  '1 NaN/inf voxels'),
    'inf voxel': ('t2', lambda d, g: _nifti(d / 't2.nii.gz', g['t2'], _with_voxel(g, np.inf)),
                  '1 NaN/inf voxels'),
    'zero-size volume': (('t1', 't2'), lambda d, g: _nifti(d / 't2.nii.gz', g['t2'],
                                                   np.zeros((32, 32, 0), np.float32)),
                         'holds no voxels (shape (32, 32, 0))'),
    '1-pixel volume': (('t1', 't2'), lambda d, g: _nifti(d / 't2.nii.gz', g['t2'],
                                                 np.ones((1, 1, 1), np.float32)),
                       'slices of 1x1 voxels; the model needs at least 8x8'),
    'complex voxels': ('t2', lambda d, g: _nifti(d / 't2.nii.gz', g['t2'],
                                                 _voxels(g['t2']).astype(np.complex64)),
                       'voxels of type complex64; expected a real-valued magnitude image'),
    '4-D volume': ('t2', lambda d, g: _nifti(d / 't2.nii.gz', g['t2'],
                                             np.ones((32, 32, 4, 3), np.float32)),
                   'expected a 3-D volume, got shape (32, 32, 4, 3)'),
    'all-zero volume': ('t2', lambda d, g: _nifti(d / 't2.nii.gz', g['t2'],
                                                  np.zeros((32, 32, 4), np.float32)),
                        'the volume is empty'),
    'T1 on another grid': ('t1', lambda d, g: _nifti(d / 't1.nii.gz', g['t1'],
                                                     np.ones((34, 32, 4), np.float32)),
                           'T1 and T2 differ in size'),
    # fastMRI h5.
    'truncated h5': ('kspace', lambda d, g: _truncated(d / 'k.h5', g['kspace']),
                     'not a readable fastMRI h5 file'),
    'random bytes h5': ('reference', lambda d, g: _write(d / 'r.h5', os.urandom(4000)),
                        'not a readable fastMRI h5 file'),
    'h5 without kspace': ('kspace', lambda d, g: _h5_without_kspace(d / 'k.h5'),
                          'not a readable fastMRI h5 file with "kspace"'),
    'NaN k-space': ('kspace', lambda d, g: _kspace_file(
        d / 'k.h5', g, lambda k: np.where(np.arange(k.size).reshape(k.shape) == 5, np.nan, k)
        .astype(k.dtype)), '"kspace" holds NaN/inf samples'),
    'real k-space': ('kspace', lambda d, g: _kspace_file(d / 'k.h5', g,
                                                          lambda k: np.abs(k).astype(np.int16)),
                     '"kspace" must be complex (slices, rows, cols) single-coil or '
                     '(slices, coils, rows, cols) multi-coil data'),
    '1-pixel k-space': ('kspace', lambda d, g: _kspace_file(d / 'k.h5', g, lambda k: k[:, :1, :1]),
                        "k-space of 1x1 is smaller than the model's image size 32"),
    'kspace group, not a dataset': ('kspace', lambda d, g: _h5_with_a_kspace_group(d / 'k.h5'),
                                    'not a readable fastMRI h5 file with "kspace" ("kspace" is a '
                                    'Group, not a dataset)'),
    'mask of no column': ('kspace', lambda d, g: _kspace_file(d / 'k.h5', g, lambda k: k,
                                                              mask=np.zeros),
                          'its "mask" marks no k-space column as sampled'),
    'all-zero k-space': ('kspace', lambda d, g: _kspace_file(d / 'k.h5', g, np.zeros_like),
                         '"kspace" holds only zeros'),
    'reference of another volume': ('reference', lambda d, g: _kspace_file(d / 'r.h5', g,
                                                                           lambda k: k[:-1]),
                                    '4 vs 3 slices; give the reference scan of the same volume'),
    # Config files: a run's config.json for a configs/*.py file, one whose code fails.
    'config.json as --config': ('config', lambda d, g: _write(d / 'config.json',
                                                              b'{"model": {"use_spa_att": false}}'),
                                'not a config file, a Python file with get_config() as '
                                "configs/*.py (ValueError: a .json file); a run's config.json is "
                                'read from the run itself'),
    'config that does not run': ('config', lambda d, g: _write(d / 'broken.py',
                                                               b'def get_config(:\n'),
                                 'not a config file, a Python file with get_config() as '
                                 'configs/*.py (SyntaxError: '),
    # Checkpoints.
    'truncated .pth': ('checkpoint', lambda d, g: _truncated(d / 'w.pth', _torch_file(
        d / 'full.pth', g)), 'not a readable PyTorch checkpoint (truncated or corrupt?)'),
    'random bytes .pth': ('checkpoint', lambda d, g: _write(d / 'w.pth', b'\x07' + os.urandom(999)),
                          'not a readable PyTorch checkpoint'),
    'empty .pth': ('checkpoint', lambda d, g: _write(d / 'w.pth', b''), 'empty file (0 bytes)'),
    '.pth with pickled code': ('checkpoint', lambda d, g: _torch_file(d / 'w.pth', g,
                                                                       optimizer=_RunsCode()),
                               'refused: it holds Python objects other than tensors'),
    '.pth of another model': ('checkpoint', lambda d, g: _torch_file(
        d / 'w.pth', g, lambda sd: {k: v for k, v in sd.items() if k != _first_conv_key(sd)}),
                              'state_dict does not match the model: missing 1'),
    '.pth with a NaN weight': ('checkpoint', lambda d, g: _torch_file(d / 'w.pth', g,
                                                                       _nan_in_first_conv),
                               'NaN/inf values in 1 parameter arrays'),
    'truncated .safetensors': ('checkpoint', lambda d, g: _truncated(
        d / 'w.safetensors', _torch_file(d / 'full.safetensors', g)),
                               'not a readable safetensors file'),
    'orbax without _METADATA': ('checkpoint', lambda d, g: _orbax_copy(d / 'w', g,
                                                                         _remove_metadata),
                                'not a readable orbax checkpoint (FileNotFoundError'),
    'orbax with a truncated array file': ('checkpoint', lambda d, g: _orbax_copy(
        d / 'w', g, _truncate_largest), 'not a readable orbax checkpoint'),
    'workdir without checkpoints': ('checkpoint', lambda d, g: _mkdir(d / 'run' / 'checkpoints')
                                    .parent, 'no complete checkpoint yet'),
}


def _digests(*folders: Path) -> dict[str, str]:
  return {str(p): hashlib.sha256(p.read_bytes()).hexdigest()
          for folder in folders for p in sorted(folder.rglob('*')) if p.is_file()}


@pytest.mark.parametrize('case', sorted(RECONSTRUCT_CASES))
def test_reconstruct_refuses_bad_input_in_one_line(case, good_inputs, tmp_path, capsys):
  arguments, make_bad_input, problem = RECONSTRUCT_CASES[case]
  arguments = (arguments,) if isinstance(arguments, str) else arguments
  bad = make_bad_input(tmp_path, good_inputs)
  inputs = {**good_inputs, **{argument: bad for argument in arguments}}
  scans = ('t1', 't2') if arguments[0] in ('t1', 't2') else ('kspace', 'reference')
  out = tmp_path / 'out' / ('recon.nii.gz' if scans[0] == 't1' else 'recon.h5')
  before = _digests(tmp_path, good_inputs['checkpoint'].parent)
  code = reconstruct_cli.main([
      '--checkpoint', str(inputs['checkpoint']), '--config', str(inputs['config']),
      *(f'--{scan}={inputs[scan]}' for scan in scans), '--acceleration', '4', '--out', str(out)])
  lines = _error_lines(capsys.readouterr().err)
  assert code == 2 and len(lines) == 1, lines
  assert lines[0].startswith('fsmnet-reconstruct: error: ') and problem in lines[0], lines[0]
  assert str(bad) in lines[0] or str(bad.parent) in lines[0], lines[0]
  assert _digests(tmp_path, good_inputs['checkpoint'].parent) == before
  assert not out.parent.exists()


def test_a_run_whose_config_json_is_damaged_is_named(good_inputs, tmp_path, capsys):
  run = tmp_path / 'run'
  (run / 'checkpoints').mkdir(parents=True)
  (run / 'config.json').write_text('{"data": {')
  assert reconstruct_cli.main(['--checkpoint', str(run), f'--t1={good_inputs["t1"]}',
                               f'--t2={good_inputs["t2"]}', '--out', str(tmp_path / 'r.nii')]) == 2
  assert _error_lines(capsys.readouterr().err) == [
      f"fsmnet-reconstruct: error: {run / 'config.json'}: the run's config is not readable JSON "
      '(Expecting property name enclosed in double quotes: line 1 column 11 (char 10)); give '
      'the settings as --config']


@pytest.mark.parametrize('main,arguments,problem', [
    (reconstruct_cli.main, ['--checkpoint', 'w', '--t1', 't1.nii', '--t2', 't2.nii', '--out',
                            'r.nii.gz', '--batch-size', '0'],
     'argument --batch-size: must be at least 1, got 0'),
    (export_cli.main, ['--checkpoint', 'w', '--out', 'e.jaxexport', '--batch-size', '-1'],
     'argument --batch-size: must be at least 0, got -1'),
    (make_demo_data_cli.main, ['demo', '--image-size', '0'],
     'argument --image-size: must be at least 8, got 0')])
def test_a_number_out_of_range_is_refused_by_its_flag(main, arguments, problem, tmp_path, capsys,
                                                      monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit) as stopped:
    main(arguments)
  assert stopped.value.code == 2 and problem in capsys.readouterr().err
  assert not any(tmp_path.iterdir())


def test_training_data_with_a_corrupt_volume_is_named(tmp_path):
  root = tmp_path / 'data'
  make_demo_data(root, seed=0, num_subjects=4, num_knee_pairs=0, image_size=32, num_slices=4)
  bad = root / 'brats' / 'DemoBraTS_002' / 'DemoBraTS_002_t1.nii.gz'
  _truncated(bad, bad)
  before = _digests(root)
  done = _run('fsmnet-train', '--config', str(ROOT / 'configs' / 'tiny.py'), *SPATIAL_ONLY,
              f'--config.data.root={root}', f'--config.data.cache_dir={tmp_path / "cache"}',
              cwd=tmp_path)
  assert done.returncode == 2, done.stderr[-3000:]
  assert _error_lines(done.stderr)[-1].startswith(
      f'fsmnet-train: error: {bad}: not a readable NIfTI volume (EOFError')
  assert 'Traceback' not in done.stderr and _digests(root) == before
